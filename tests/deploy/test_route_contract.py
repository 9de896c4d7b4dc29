"""The route contract the deployment files are written against, read from the server's real app."""

from __future__ import annotations

import pytest
from _deploy import serves

PROBED = [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")]
API = [
    ("POST", "/caption"),
    ("POST", "/vqa"),
    ("POST", "/generate"),
    ("POST", "/embed"),
    ("POST", "/retrieve"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/gallery/images"),
    ("POST", "/gallery/search"),
    ("GET", "/gallery/images/cat-1"),
    ("DELETE", "/gallery/images/cat-1"),
    ("GET", "/gallery"),
    ("GET", "/v1/models"),
    ("GET", "/docs"),
]


@pytest.mark.parametrize(("method", "path"), PROBED + API)
def test_server_has_the_route(method, path):
    assert serves(method, path)


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/healthz"), ("POST", "/health"), ("GET", "/v2/health/ready")]
)
def test_route_check_is_not_vacuous(method, path):
    assert not serves(method, path)
