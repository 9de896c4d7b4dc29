"""`GET /docs`: the API reference (Swagger UI), served whole from this server, so it works air-gapped.

FastAPI's own /docs page loads Swagger UI from a CDN and starts it with an inline script: offline it is
blank, and the page's Content-Security-Policy (service/api/page.py) forbids both. Here Swagger UI's files come
from the `swagger-ui-bundle-v2` package (Swagger UI's release files as a Python package: the fork of
spec-first's `swagger-ui-bundle` that follows Swagger UI 5; the original ships 4.15, older than Swagger UI's
support for the OpenAPI 3.1 that FastAPI writes), the page and its start-up script from service/api/web/
(`docs.html`, `docs.js`). All under the page's CSP with one addition, `data:` images: Swagger UI's style
sheet draws its icons as SVG `data:` URLs (an image runs no script and fetches nothing). No inline script or
style, nothing from another origin. ReDoc is off (FastAPI's /redoc loads its script from a CDN too).

/docs, its files and /openapi.json are served without the API key, as the web page is (service/api/page.py): a
browser cannot attach a bearer header to a plain navigation, so a page behind the key could only show a JSON
401. They hold no secret and no data: the document says which routes need the key (a `bearer` security scheme
when the server has one), and Swagger UI's "Authorize" button sends it with the calls made from the page,
which stay behind it like every API route.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from swagger_ui_bundle import swagger_ui_path

from service.api.page import HEADERS, POLICY, WEB, content_security_policy, listed_file, read_file

FILES = {  # everything under /docs/: a fixed list, so no path from a request ever reaches the disk
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}

PUBLIC_PATHS = {"/docs", "/openapi.json", *(f"/docs/{name}" for name in FILES)}  # served without the key
CSP = content_security_policy({**POLICY, "img-src": POLICY["img-src"] + " data:"})
DOCS_HEADERS = {**HEADERS, "Content-Security-Policy": CSP}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs() -> Response:
    """Swagger UI over /openapi.json."""
    page = read_file(WEB / "docs.html")
    return Response(page, media_type="text/html; charset=utf-8", headers=DOCS_HEADERS)


@router.get("/docs/{name}")
async def docs_file(name: str) -> Response:
    """Swagger UI's script and style sheet, and the script that starts it."""
    folder = WEB if name.startswith("docs.") else swagger_ui_path
    return listed_file(folder, name, FILES, "/docs", DOCS_HEADERS)
