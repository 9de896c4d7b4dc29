"""Image intake: bytes in (upload, base64, data URI, allow-listed URL), an RGB PIL image out.

Limits are checked as early as they can be: bytes before the whole body is read or decoded, pixels from
the header before any pixel is decoded (a 50 kB PNG can decode to gigabytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import warnings
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import numpy as np
from fastapi import UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError

from service.api.errors import ApiError, invalid_image, too_large
from service.settings import Settings

# We cap pixels ourselves from the header; Pillow's own bomb check would only warn below 2x its limit.
Image.MAX_IMAGE_PIXELS = None
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_CHUNK = 64 * 1024


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Bytes -> RGB image: byte cap, header pixel cap, first frame, EXIF orientation, any mode to RGB."""
    if len(data) > settings.max_image_bytes:
        raise too_large(f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}")
    if not data:
        raise invalid_image("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated-EXIF and palette warnings are not the client's errors
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise too_large(
                    f"image is {width}x{height} pixels; the limit is {settings.max_image_pixels} pixels"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise invalid_image("cannot decode the image: not a supported image format") from None
    except Image.DecompressionBombError as exc:
        raise too_large(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt files
        raise invalid_image(f"cannot decode the image: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white (what a viewer shows)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: scale the actual range to 0..255 instead of clipping to white.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_base64(text: str, settings: Settings) -> bytes:
    """Raw base64 or a `data:image/...;base64,` URI -> bytes, refusing oversize input before decoding it."""
    match = _DATA_URI.match(text)
    if match:
        if not match.group("b64"):
            raise invalid_image("data URIs must be base64-encoded (`data:image/png;base64,...`)")
        text = text[match.end() :]
    if len(text) * 3 // 4 > settings.max_image_bytes + 3:
        raise too_large(f"image is over {settings.max_image_bytes} bytes")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_image("the image is not valid base64") from None


async def _read_capped(chunks: AsyncIterator[bytes], limit: int, over_limit: str) -> bytes:
    """The chunks joined, stopping (413) as soon as they pass `limit` bytes."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(over_limit)
        parts.append(chunk)
    return b"".join(parts)


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """A multipart file part -> bytes, stopping as soon as it passes the byte cap."""

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await upload.read(_CHUNK):
            yield chunk

    limit = settings.max_image_bytes
    return await _read_capped(
        chunks(), limit, f"image {upload.filename or ''} is over {limit} bytes".replace("  ", " ")
    )


def url_allowed(url: str, settings: Settings) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and bool(host) and host in settings.allowed_url_hosts


async def fetch_url(url: str, settings: Settings) -> bytes:
    """Fetch an image from an operator allow-listed host, with a timeout and the byte cap; no redirects."""
    host = urlsplit(url).hostname or ""
    if not url_allowed(url, settings):
        raise ApiError(
            400, "url_not_allowed", f"fetching images from {host or url!r} is not allowed on this server"
        )
    try:  # a literal link-local address (cloud metadata) is refused even if someone allow-listed it
        if ipaddress.ip_address(host).is_link_local:
            raise ApiError(400, "url_not_allowed", "link-local addresses are never fetched")
    except ValueError:
        pass
    try:
        async with httpx.AsyncClient(timeout=settings.url_fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise invalid_image(f"fetching the image failed with HTTP {response.status_code}")
                declared = int(response.headers.get("content-length") or 0)
                if declared > settings.max_image_bytes:
                    raise too_large(f"image is {declared} bytes; the limit is {settings.max_image_bytes}")
                limit = settings.max_image_bytes
                return await _read_capped(response.aiter_bytes(_CHUNK), limit, f"image is over {limit} bytes")
    except httpx.TimeoutException:
        raise ApiError(400, "url_fetch_failed", "fetching the image timed out") from None
    except httpx.HTTPError as exc:
        raise ApiError(400, "url_fetch_failed", f"fetching the image failed: {type(exc).__name__}") from None


async def bytes_from_string(value: str, settings: Settings) -> bytes:
    """The bytes of a JSON image field: data URI, base64, or (when allow-listed) an http(s) URL."""
    if value.startswith(("http://", "https://")):
        return await fetch_url(value, settings)
    return decode_base64(value, settings)


async def image_from_string(value: str, settings: Settings) -> Image.Image:
    """A JSON image field, decoded."""
    data = await bytes_from_string(value, settings)
    return await asyncio.to_thread(decode_image, data, settings)  # decoding is CPU work: off the event loop


async def image_from_upload(upload: UploadFile, settings: Settings) -> Image.Image:
    return await asyncio.to_thread(decode_image, await read_upload(upload, settings), settings)
