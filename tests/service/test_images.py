"""Image intake on scikit-image's real photos: every mode to RGB, EXIF orientation, first frame of an
animation, byte and pixel caps before decoding, and allow-listed URL fetches from a loopback server."""

from __future__ import annotations

import asyncio
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image
from servertools import b64, encode, photo, running_app, settings_for
from skimage import data

from service.api.errors import ApiError, refusal
from service.api.images import decode_base64, fetch_url
from service.engine.images import ImageTooLarge, InvalidImage, decode_image
from service.settings import Settings

SETTINGS = Settings(model=None, max_image_bytes=5_000_000, max_image_pixels=2_000_000)


def status_of(call) -> int:
    """The status the refusal is answered with: an API error's own, an engine error's as the API maps it."""
    with pytest.raises((ApiError, InvalidImage, ImageTooLarge)) as caught:
        call()
    error = caught.value
    return error.status if isinstance(error, ApiError) else refusal(error).status


def test_rgba_and_palette_transparency_composite_on_white():
    rgba = photo("astronaut").resize((64, 64)).convert("RGBA")
    pixels = np.asarray(rgba).copy()
    pixels[:8, :8, 3] = 0  # a fully transparent corner
    decoded = decode_image(encode(Image.fromarray(pixels, "RGBA")), SETTINGS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    palette = photo("coffee").resize((64, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    corner = palette.getpixel((0, 0))
    decoded = decode_image(encode(palette, "PNG", transparency=corner), SETTINGS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    gif = decode_image(encode(palette, "GIF", transparency=corner), SETTINGS)
    assert gif.getpixel((0, 0)) == (255, 255, 255)


def test_grey_16bit_cmyk_and_webp():
    grey = decode_image(encode(Image.fromarray(data.camera())), SETTINGS)
    r, g, b = grey.split()
    assert grey.mode == "RGB" and r.tobytes() == g.tobytes() == b.tobytes()
    sixteen = Image.fromarray(data.camera().astype(np.uint16) * 200)  # 16-bit greyscale
    decoded = np.asarray(decode_image(encode(sixteen, "PNG"), SETTINGS))
    assert decoded.max() == 255 and decoded.min() == 0  # scaled, not clipped to white
    original = photo("chelsea")
    cmyk = decode_image(encode(original.convert("CMYK"), "JPEG", quality=95), SETTINGS)
    assert cmyk.mode == "RGB" and cmyk.size == original.size
    assert np.abs(np.asarray(cmyk, dtype=float) - np.asarray(original, dtype=float)).mean() < 12
    webp = decode_image(encode(original, "WEBP"), SETTINGS)
    assert webp.mode == "RGB" and webp.size == original.size


def test_exif_orientation_applied():
    image = photo("rocket").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), SETTINGS)
    assert decoded.size == (80, 120)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, blue = decode_image(buffer.getvalue(), SETTINGS).getpixel((16, 16))
    assert red > 200 and blue < 50


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of data: decoding it would explode."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_caps_before_decoding():
    assert status_of(lambda: decode_image(bomb_png(60_000, 60_000), SETTINGS)) == 413  # 3.6 gigapixels
    assert status_of(lambda: decode_image(b"\0" * 5_000_001, SETTINGS)) == 413
    assert status_of(lambda: decode_base64("A" * 7_000_000, SETTINGS)) == 413  # refused before b64decode
    assert status_of(lambda: decode_image(encode(photo(), "PNG")[:2000], SETTINGS)) == 400  # truncated
    assert status_of(lambda: decode_image(b"GIF89a garbage", SETTINGS)) == 400
    assert status_of(lambda: decode_base64("data:image/png,rawbytes", SETTINGS)) == 400
    assert decode_base64(b64(b"abc", data_uri=True), SETTINGS) == b"abc"


def test_bomb_through_the_route(checkpoints):
    with running_app(settings_for(checkpoints["tiny-opt"] / "generation", warmup=False)) as client:
        response = client.post(
            "/caption", files={"image": ("bomb.png", bomb_png(60_000, 60_000), "image/png")}
        )
        assert response.status_code == 413 and "pixels" in response.json()["error"]["message"]


class _Images(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        status, body, headers = self.routes.get(self.path, (404, b"", {}))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    png = encode(photo("coffee").resize((80, 80)))
    _Images.routes = {
        "/coffee.png": (200, png, {"Content-Type": "image/png"}),
        "/big.png": (200, b"\0" * 6_000_000, {}),
        "/moved.png": (302, b"", {"Location": "http://169.254.169.254/"}),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_fetch_only_from_allowed_hosts(image_host):
    allowed = SETTINGS.model_copy(update={"allowed_url_hosts": ["127.0.0.1"]})
    assert asyncio.run(fetch_url(image_host + "/coffee.png", allowed))[:4] == b"\x89PNG"
    assert (
        status_of(lambda: asyncio.run(fetch_url(image_host + "/coffee.png", SETTINGS))) == 400
    )  # off by default
    assert status_of(lambda: asyncio.run(fetch_url(image_host + "/big.png", allowed))) == 413
    assert (
        status_of(lambda: asyncio.run(fetch_url(image_host + "/moved.png", allowed))) == 400
    )  # no redirects
    assert status_of(lambda: asyncio.run(fetch_url("file:///etc/passwd", allowed))) == 400


def test_url_through_the_routes(checkpoints, image_host):
    folder = checkpoints["tiny-opt"] / "generation"
    settings = settings_for(folder, allowed_url_hosts="127.0.0.1", warmup=False)
    with running_app(settings) as client:
        assert client.post("/caption", json={"image": image_host + "/coffee.png"}).status_code == 200
        chat = {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                             {"type": "image_url", "image_url": {"url": image_host + "/coffee.png"}}]}
            ]
        }  # fmt: skip
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
