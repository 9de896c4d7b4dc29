"""Image decoding: bytes in, an RGB PIL image out, refused with `InvalidImage` or `ImageTooLarge` (the API
answers 400 and 413). Pixels are capped from the header before any pixel is decoded (a 50 kB PNG can decode to
gigabytes); how the bytes arrive (upload, base64, URL) is the API's intake, service/api/images.py."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.settings import Settings

# We cap pixels ourselves from the header; Pillow's own bomb check would only warn below 2x its limit.
Image.MAX_IMAGE_PIXELS = None


class InvalidImage(Exception):
    """The bytes are no image the server can decode; the message says why, for the client."""


class ImageTooLarge(Exception):
    """The image is over the server's byte or pixel cap; the message says which, for the client."""


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Bytes -> RGB image: byte cap, header pixel cap, first frame, EXIF orientation, any mode to RGB."""
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}")
    if not data:
        raise InvalidImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated-EXIF and palette warnings are not the client's errors
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} pixels; the limit is {settings.max_image_pixels} pixels"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (InvalidImage, ImageTooLarge):
        raise
    except UnidentifiedImageError:
        raise InvalidImage("cannot decode the image: not a supported image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt files
        raise InvalidImage(f"cannot decode the image: {exc}") from None


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
