"""Each error status the server promises, provoked for real: 400, 401, 413, 415, 422, 501, 503, 504."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from servertools import Gate, b64, encode, metric, running_app, settings_for


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return body["error"]


def test_400_undecodable_image(opt8, photos):
    assert (
        error_of(opt8.post("/caption", json={"image": b64(b"not an image at all")}), 400)["type"]
        == "invalid_image"
    )
    assert error_of(opt8.post("/caption", json={"image": "%%%not base64%%%"}), 400)["type"] == "invalid_image"
    truncated = encode(photos[0], "JPEG")[:300]
    assert error_of(opt8.post("/caption", files={"image": ("t.jpg", truncated, "image/jpeg")}), 400)
    assert error_of(
        opt8.post("/caption", content=b"{not json", headers={"content-type": "application/json"}), 400
    )


def test_400_remote_urls_off_by_default(opt8):
    error = error_of(opt8.post("/caption", json={"image": "http://169.254.169.254/latest/meta-data"}), 400)
    assert error["type"] == "url_not_allowed"


def test_413_too_many_bytes_and_pixels(checkpoints, photos):
    folder = checkpoints["tiny-opt"] / "generation"
    with running_app(
        settings_for(folder, max_image_bytes=20_000, max_image_pixels=64 * 64, warmup=False)
    ) as client:
        big = encode(photos[0].resize((400, 400)), "BMP")  # 480 kB
        assert error_of(client.post("/caption", json={"image": b64(big)}), 413)["type"] == "payload_too_large"
        assert error_of(client.post("/caption", files={"image": ("b.bmp", big, "image/bmp")}), 413)
        many_pixels = encode(Image.new("RGB", (300, 300), (9, 9, 9)), "PNG")  # small file, too many pixels
        assert len(many_pixels) < 20_000
        assert "pixels" in error_of(client.post("/caption", json={"image": b64(many_pixels)}), 413)["message"]
        # A declared body far over the cap is refused before it is read; a chunked one as it streams in.
        huge = client.post("/caption", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
        assert error_of(huge, 413)
        chunks = (b"x" * 65536 for _ in range(40))  # 2.6 MB without a Content-Length
        streamed = client.post("/caption", content=chunks, headers={"content-type": "application/json"})
        assert error_of(streamed, 413)["type"] == "payload_too_large"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/caption", {"image": "QUJD", "num_beams": 0}),
        ("/caption", {"image": "QUJD", "num_beams": 100}),  # over max_num_beams
        ("/caption", {"image": "QUJD", "max_new_tokens": 10_000}),  # over max_new_tokens_limit
        ("/caption", {"image": "QUJD", "temperature": -1}),
        ("/caption", {"image": "QUJD", "unknown_field": 1}),
        ("/caption", {}),  # no image
        ("/vqa", {"image": "QUJD"}),  # no question
        ("/vqa", {"image": "QUJD", "question": "x" * 5000}),  # over max_prompt_chars
        ("/embed", {}),
        ("/retrieve", {"text": "a", "image": "QUJD", "texts": ["a"]}),  # two queries
        ("/retrieve", {"text": "a cat", "images": []}),  # no candidates
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "no image"}]}),
        ("/v1/chat/completions", {"messages": []}),
        ("/generate", []),
    ],
)
def test_422_invalid_fields(opt8, path, body):
    assert error_of(opt8.post(path, json=body), 422)["type"] == "invalid_request"


def test_422_prompt_longer_than_the_llm(opt8, photos):
    # The tiny OPT has 256 positions: 8 query tokens + prompt + 250 new tokens do not fit.
    response = opt8.post(
        "/generate", json={"image": b64(photos[0]), "prompt": "a photo of a cat", "max_new_tokens": 250}
    )
    assert "positions" in error_of(response, 422)["message"]


def test_415_other_content_types(opt8):
    response = opt8.post("/caption", content=b"image", headers={"content-type": "text/plain"})
    assert error_of(response, 415)["type"] == "unsupported_media_type"


def test_404_and_405_in_the_same_format(opt8):
    assert error_of(opt8.get("/nope"), 404)["type"] == "not_found"
    assert error_of(opt8.get("/caption"), 405)["type"] == "method_not_allowed"


def test_401_without_the_api_key(checkpoints, photos):
    folder = checkpoints["tiny-opt"] / "generation"
    with running_app(settings_for(folder, api_key="s3cret", warmup=False)) as client:
        assert client.get("/health").status_code == 200  # probes and scrapes stay open
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        error = error_of(client.post("/caption", json={"image": b64(photos[0])}), 401)
        assert error["type"] == "unauthorized" and "s3cret" not in json.dumps(error)
        assert error_of(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/docs").status_code == 200  # the API reference is open, as the page is
        ok = client.post(
            "/caption", json={"image": b64(photos[0])}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200


def test_501_route_without_its_model(checkpoints, photos):
    opt = checkpoints["tiny-opt"]
    with running_app(settings_for(opt / "generation", warmup=False)) as client:
        error = error_of(client.post("/embed", json={"texts": ["a cat"]}), 501)
        assert error["type"] == "model_not_loaded" and "--retrieval-model" in error["message"]
        assert error_of(client.post("/retrieve", json={"text": "a", "images": [b64(photos[0])]}), 501)
    # A retrieval checkpoint given as --model serves /embed and /retrieve only.
    with running_app(settings_for(opt / "stage1", warmup=False)) as client:
        assert client.post("/embed", json={"texts": ["a cat"]}).status_code == 200
        assert (
            error_of(client.post("/caption", json={"image": b64(photos[0])}), 501)["type"]
            == "model_not_loaded"
        )


def test_503_while_loading_fails_and_504_past_the_deadline(checkpoints, photos, tmp_path):
    with running_app(settings_for(checkpoints["tiny-opt"] / "generation", request_timeout_s=0.2)) as client:
        app = client.app
        with Gate(app):  # the model thread is busy: the request cannot finish within 0.2 s
            error = error_of(client.post("/caption", json={"image": b64(photos[0])}), 504)
            assert error["type"] == "timeout"
        assert (
            metric(client.get("/metrics").text, "blip2_requests_total", route="/caption", status="504") == 1
        )
    # A folder that is not a model: liveness and readiness both say so, inference routes answer 503.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(settings_for(tmp_path))) as client:
        while client.app.state.server.phase == "loading":
            pass
        assert error_of(client.get("/ready"), 503)["type"] == "unavailable"
        assert error_of(client.get("/health"), 503)
        assert error_of(client.post("/caption", json={"image": b64(photos[0])}), 503)


def test_no_client_error_is_a_500(opt8, photos):
    """A volley of malformed requests: each is answered 4xx, none 500."""
    bodies = [{"image": 5}, {"image": ["a"]}, {"image": None}, {"image": b64(photos[0]), "prompt": 7},
              {"image": b64(photos[0]), "length_penalty": "x"}, {"image": "data:image/png,abc"},
              {"image": "data:;base64,"}, {"image": b64(photos[0]), "max_new_tokens": 5.5}]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda b: opt8.post("/caption", json=b).status_code, bodies))
    assert all(400 <= s < 500 for s in statuses), statuses
