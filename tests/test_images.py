"""Input images: hostile, corrupt and oversized files are refused quickly with a clear reason."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from bots.images import ImageRejected, load_image, precheck_image
from turbobot.config import LimitsSettings

LIM = LimitsSettings()


def png_bytes(w: int = 64, h: int = 48, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 40)).save(buf, format=fmt, **save)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (the data is not even there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_good_images_are_reencoded_to_png() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        v = load_image(png_bytes(fmt=fmt), LIM)
        assert (v.width, v.height) == (64, 48)
        assert v.png_bytes.startswith(b"\x89PNG")
        assert len(v.sha256) == 64


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (80, 40))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    v = load_image(buf.getvalue(), LIM)
    assert (v.width, v.height) == (40, 80)


def test_animation_takes_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    v = load_image(buf.getvalue(), LIM)
    first = Image.open(io.BytesIO(v.png_bytes)).convert("RGB").getpixel((5, 5))
    assert first[0] > 200 and first[1] < 50


def test_decompression_bomb_refused_fast() -> None:
    data = bomb_png(30000, 30000)
    assert len(data) < 600
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected, match="too large"):
        load_image(data, LIM)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 100, "not a PNG, JPEG or WebP"),
        (b"%PDF-1.4 hello", "not a PNG, JPEG or WebP"),
        (png_bytes()[:60], "corrupt or truncated"),
        (png_bytes(8, 8), "too small"),
    ],
)
def test_bad_files(data: bytes, needle: str) -> None:
    with pytest.raises(ImageRejected, match=needle):
        load_image(data, LIM)


def test_gif_is_refused_even_if_valid() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    with pytest.raises(ImageRejected, match="not a PNG, JPEG or WebP"):
        load_image(buf.getvalue(), LIM)


def test_precheck_before_download() -> None:
    precheck_image(1000, "image/png", 512, 512, LIM)
    with pytest.raises(ImageRejected, match="too big"):
        precheck_image(LIM.max_image_bytes + 1, "image/png", None, None, LIM)
    with pytest.raises(ImageRejected, match="not a supported image"):
        precheck_image(1000, "application/pdf", None, None, LIM)
    with pytest.raises(ImageRejected, match="too large"):
        precheck_image(1000, "image/jpeg", 30000, 30000, LIM)
    with pytest.raises(ImageRejected, match="empty"):
        precheck_image(0, None, None, None, LIM)
