"""`GET /`: the web page for people, served from the files in service/api/web/ as they are (no build step,
nothing loaded from the internet, so it works air-gapped).

The page is a client of the public API and nothing more: it calls the same routes a curl user calls,
reads the same JSON errors, and, when the server has an API key, sends the key the person types as
`Authorization: Bearer`. The page's own files hold no secret and no data, so they are served without
the key (like /health): a browser cannot attach a bearer header to a plain navigation, and the page has
to load before it can ask for the key. Every API route stays behind the key; nothing here bypasses it.

The Content-Security-Policy allows only the page's own files: its one script and one style sheet from
this origin (no inline code or styles), calls to this origin only, and images from this origin or from
`blob:` URLs the page makes of the person's own files.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.errors import ApiError

WEB = Path(__file__).parent / "web"
STATIC = {  # everything under /static/: a fixed list, so no path from a request ever reaches the disk
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PUBLIC_PATHS = {"/", *(f"/static/{name}" for name in STATIC)}  # served without the API key (see above)
POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' blob:",
    "connect-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}


def content_security_policy(policy: dict[str, str]) -> str:
    """The header's text for {directive: sources}."""
    return "; ".join(f"{directive} {sources}" for directive, sources in policy.items())


CSP = content_security_policy(POLICY)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a server upgrade never leaves an old script with a new page
}

router = APIRouter(include_in_schema=False)


@cache
def read_file(path: Path) -> bytes:
    return path.read_bytes()


def listed_file(
    folder: Path, name: str, listed: dict[str, str], route: str, headers: dict[str, str]
) -> Response:
    """`route/name` from `folder` when `listed` names it (its media type): no path from a request ever
    reaches the disk unchecked; anything else is a JSON 404."""
    if name not in listed:
        raise ApiError(404, "not_found", f"no file {route}/{name}")
    return Response(read_file(folder / name), media_type=listed[name], headers=headers)


@router.get("/")
async def index() -> Response:
    """The page: image, caption, questions, gallery search."""
    return Response(read_file(WEB / "index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The page's script, style sheet and icon."""
    return listed_file(WEB, name, STATIC, "/static", HEADERS)
