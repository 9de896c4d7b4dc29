"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): real images where the document asks for one.

JSON Schema cannot say that a string or a file part decodes as an image, so the document marks image strings
with the project's format `image` (its file parts are `binary`, all images); these strategies draw small
real photos for both, so a request the document allows is one the server can answer.
"""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image
from skimage import data

SOURCES = ("astronaut", "coffee", "chelsea", "rocket")


def _png(name: str, size: int) -> bytes:
    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


PNGS = [_png(name, size) for name in SOURCES for size in (16, 40)]
png_bytes = st.sampled_from(PNGS)
# base64 and data: URIs, the two forms a JSON image takes without network
image_strings = png_bytes.flatmap(
    lambda raw: st.sampled_from(
        [base64.b64encode(raw).decode(), "data:image/png;base64," + base64.b64encode(raw).decode()]
    )
)

schemathesis.openapi.format("image", image_strings)
schemathesis.openapi.format("binary", png_bytes)  # the document's file parts all hold images


@schemathesis.hook
def filter_case(context, case) -> bool:
    """No negative cases in multipart: every form field is text on the wire, so a value of the wrong JSON type
    is not wrong there (`{}` for a text field is the text "{}"; `[]` for a number is no part at all)."""
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    return not (negative and (case.media_type or "").startswith("multipart/"))
