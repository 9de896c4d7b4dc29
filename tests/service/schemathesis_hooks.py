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


MOST_CHAT_TEXTS = 3  # texts in one conversation that the built-in model's Q-Former (64 tokens) always fits


@schemathesis.hook
def filter_case(context, case) -> bool:
    """Two kinds of case the document cannot make valid or invalid, left out:

    - negative cases in multipart: every form field is text on the wire, so a value of the wrong JSON type is
      not wrong there (`{}` for a text field is the text "{}"; `[]` for a number is no part at all);
    - chat conversations of more texts than the model reads: JSON Schema counts characters, not tokens (each
      text is bounded; the whole prompt in tokens is the model's, answered 422).
    """
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if negative and (case.media_type or "").startswith("multipart/"):
        return False
    if not negative and case.path == "/v1/chat/completions" and isinstance(case.body, dict):
        messages = case.body.get("messages")
        if isinstance(messages, list) and _texts(messages) > MOST_CHAT_TEXTS:
            return False
    return True


def _texts(messages: list) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        count += sum(1 for part in parts if isinstance(part, (str, dict)))
    return count
