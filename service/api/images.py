"""Image intake: bytes in (upload, base64, data URI, allow-listed URL), an RGB PIL image out (decoded by
service.engine.images).

Limits are checked as early as they can be: bytes before the whole body is read or decoded, pixels from
the header before any pixel is decoded (a 50 kB PNG can decode to gigabytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from fastapi import UploadFile
from PIL import Image

from service.api.errors import ApiError, invalid_image, too_large
from service.engine.images import decode_image
from service.settings import Settings

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_CHUNK = 64 * 1024


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
