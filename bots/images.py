"""Input image checks shared by every front end: cheap checks before download, strict decoding after.

Pillow is restricted to PNG, JPEG and WebP; the pixel limit is enforced from the header before any pixel is
decoded, and DecompressionBombWarning is an error, so a tiny file claiming 30000x30000 is refused in
milliseconds. Accepted images get EXIF orientation applied, the first frame of animations, and are re-encoded
as PNG (dropping metadata) before they are stored.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from turbobot.config import LimitsSettings

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ALLOWED_CONTENT_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
MIN_SIDE = 16


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
    limits: LimitsSettings,
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


def _check_dimensions(width: int, height: int, limits: LimitsSettings) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageRejected(f"That image is too small ({width}x{height}); it needs at least {MIN_SIDE}x{MIN_SIDE}.")
    if width > limits.max_image_side or height > limits.max_image_side or width * height > limits.max_image_pixels:
        raise ImageRejected(
            f"That image is too large ({width}x{height} pixels); the limit is {limits.max_image_side} pixels "
            f"a side and {limits.max_image_pixels / 1e6:.0f} megapixels."
        )


def load_image(data: bytes, limits: LimitsSettings) -> ValidatedImage:
    """Decode, check and re-encode an uploaded image; raise ``ImageRejected`` with a clear reason."""
    if not data:
        raise ImageRejected("That file is empty. Please send a PNG, JPEG or WebP image.")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(
            f"That image is too big ({_mb(len(data))}); the limit is {_mb(limits.max_image_bytes)}."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            _check_dimensions(img.width, img.height, limits)  # header only: nothing decoded yet
            img.seek(0)  # first frame of an animation
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("That file is not a PNG, JPEG or WebP image I can read.") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageRejected("That image is too large (its header claims an enormous size) and was refused.") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageRejected("That image is corrupt or truncated; please send it again.") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    png = out.getvalue()
    return ValidatedImage(png_bytes=png, width=rgb.width, height=rgb.height, sha256=hashlib.sha256(png).hexdigest())
