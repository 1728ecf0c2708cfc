"""Input image checks shared by every front end: cheap checks before download, strict decoding after.

Pillow is restricted to PNG, JPEG and WebP; the pixel limit is enforced from the header before any pixel is
decoded, and DecompressionBombWarning is an error, so a tiny file claiming 30000x30000 is refused in
milliseconds. Accepted images get EXIF orientation applied, the first frame of animations, and are re-encoded
as PNG (dropping metadata) before they are stored.

Every Pillow mode is turned into the RGB a viewer shows (``to_display_rgb``): transparency is composited on
white (what chat clients and browsers show on their light themes, and what the console's playground shows),
16-bit samples are scaled down (65535 -> 255) rather than clipped, and Pillow's warnings are never shown.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from generator.params import Limits

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ALLOWED_CONTENT_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
MIN_SIDE = 16
# Transparent pixels are shown on this background (see the module docstring).
BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageRejected(ValueError):
    """The image cannot be used; ``message`` is friendly and safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ValidatedImage:
    png_bytes: bytes
    width: int
    height: int
    sha256: str


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB"


def precheck_image(
    size: int | None,
    content_type: str | None,
    width: int | None,
    height: int | None,
    limits: Limits,
) -> None:
    """Refuse from metadata alone (platform-reported size, type, dimensions) before downloading."""
    if size is not None:
        if size <= 0:
            raise ImageRejected("That file is empty. Please send a PNG, JPEG or WebP image.")
        if size > limits.max_image_bytes:
            raise ImageRejected(
                f"That image is too big ({_mb(size)}); the limit is {_mb(limits.max_image_bytes)}. "
                "Please send a smaller one."
            )
    if content_type is not None and content_type.split(";")[0].strip().lower() not in ALLOWED_CONTENT_TYPES:
        raise ImageRejected(
            f"That file is not a supported image ({content_type}). Please send a PNG, JPEG or WebP image."
        )
    if width is not None and height is not None:
        _check_dimensions(width, height, limits)


def _check_dimensions(width: int, height: int, limits: Limits) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageRejected(f"That image is too small ({width}x{height}); it needs at least {MIN_SIDE}x{MIN_SIDE}.")
    if width > limits.max_image_side or height > limits.max_image_side or width * height > limits.max_image_pixels:
        raise ImageRejected(
            f"That image is too large ({width}x{height} pixels); the limit is {limits.max_image_side} pixels "
            f"a side and {limits.max_image_pixels / 1e6:.0f} megapixels."
        )


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float gray image to 0-255 the way a viewer shows it."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        full = 65535.0
    elif img.mode == "I":
        # Pillow stores 16-bit samples (PNG, TIFF) in mode I, so 0-65535 data is 16-bit; wider data is taken
        # as 32-bit. Negative intensities have no display meaning and show as black.
        full = 65535.0 if a.size == 0 or int(a.max()) <= 65535 else float(2**31 - 1)
    else:  # "F": floats are 0.0-1.0 by convention; larger values follow Pillow's own 0-255 float scale
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        full = 1.0 if a.size == 0 or float(a.max()) <= 1.0 else 255.0
    scaled = np.clip(a.astype(np.float64), 0.0, full) * (255.0 / full)
    return np.rint(scaled).astype(np.uint8)


def _on_background(rgba: Image.Image) -> Image.Image:
    back = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(back, rgba).convert("RGB")


def to_display_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB image a viewer shows for ``img``, whatever its Pillow mode."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = Image.fromarray(_gray_to_uint8(img))
        key = img.info.get("transparency")
        if isinstance(key, int) and mode != "F":  # 16-bit PNG tRNS: one sample value is transparent
            keyed = Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))
            return _on_background(Image.merge("RGBA", (gray, gray, gray, keyed)))
        return gray.convert("RGB")
    if mode == "La":  # premultiplied gray + alpha: Pillow has no direct conversion
        lum, premult_alpha = img.split()
        img = Image.merge("RGBa", (lum, lum, lum, premult_alpha))
        mode = "RGBa"
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_background(img.convert("RGBA"))
    return img.convert("RGB")


def _is_text_chunk_limit(exc: ValueError) -> bool:
    """Pillow refuses PNG text chunks beyond PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY."""
    text = str(exc).lower()
    return "decompressed data too large" in text or "max_text" in text or "text chunks" in text


def load_image(data: bytes, limits: Limits) -> ValidatedImage:
    """Decode, check and re-encode an uploaded image; raise ``ImageRejected`` with a clear reason."""
    if not data:
        raise ImageRejected("That file is empty. Please send a PNG, JPEG or WebP image.")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(
            f"That image is too big ({_mb(len(data))}); the limit is {_mb(limits.max_image_bytes)}."
        )
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (palette transparency, malformed EXIF...) are not the user's business; a
            # decompression bomb is, and becomes an error.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            _check_dimensions(img.width, img.height, limits)  # header only: nothing decoded yet
            img.seek(0)  # first frame of an animation
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_display_rgb(img)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("That file is not a PNG, JPEG or WebP image I can read.") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageRejected("That image is too large (its header claims an enormous size) and was refused.") from None
    except ValueError as exc:
        if _is_text_chunk_limit(exc):
            raise ImageRejected(
                "That PNG carries too much embedded text (metadata) to read safely. Please re-save it without "
                "metadata, or send it as a JPEG, and try again."
            ) from None
        raise ImageRejected("That image is corrupt or truncated; please send it again.") from None
    except (OSError, SyntaxError, EOFError):
        raise ImageRejected("That image is corrupt or truncated; please send it again.") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    png = out.getvalue()
    return ValidatedImage(png_bytes=png, width=rgb.width, height=rgb.height, sha256=hashlib.sha256(png).hexdigest())
