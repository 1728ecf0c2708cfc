"""Input images: hostile, corrupt and oversized files are refused quickly with a clear reason."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from bots.images import ImageRejected, load_image, precheck_image
from generator.params import Limits

LIM = Limits()


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


# --- every Pillow mode becomes the RGB a viewer shows (transparency on white, 16-bit scaled, not clipped) ---

WHITE = (255, 255, 255)


def _solid(mode: str, value: object) -> Image.Image:
    return Image.new(mode, (32, 24), value)  # type: ignore[arg-type]


def _palette(transparency: object = None) -> Image.Image:
    img = Image.new("P", (32, 24), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def _with_key(img: Image.Image, key: object) -> Image.Image:
    img.info["transparency"] = key
    return img


def _pa(alpha: int) -> Image.Image:
    img = Image.new("PA", (32, 24), (1, alpha))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    return img


MODE_CASES = [
    ("1 black", lambda: _solid("1", 0), (0, 0, 0)),
    ("1 white", lambda: _solid("1", 1), WHITE),
    ("L", lambda: _solid("L", 100), (100, 100, 100)),
    ("L with transparent key", lambda: _with_key(_solid("L", 100), 100), WHITE),
    ("LA opaque", lambda: _solid("LA", (100, 255)), (100, 100, 100)),
    ("LA transparent", lambda: _solid("LA", (0, 0)), WHITE),
    ("LA half", lambda: _solid("LA", (0, 128)), (127, 127, 127)),
    ("La half (premultiplied)", lambda: _solid("La", (50, 128)), (177, 177, 177)),
    ("P", _palette, (0, 0, 255)),
    ("P transparent index", lambda: _palette(1), WHITE),
    ("P transparency bytes", lambda: _palette(bytes([255, 0])), WHITE),
    ("PA half", lambda: _pa(128), (127, 127, 255)),
    ("I;16 near black", lambda: _solid("I;16", 1000), (4, 4, 4)),
    ("I;16 full", lambda: _solid("I;16", 65535), WHITE),
    ("I;16B near black", lambda: _solid("I;16B", 1000), (4, 4, 4)),
    ("I;16L mid", lambda: _solid("I;16L", 32768), (128, 128, 128)),
    ("I;16N near black", lambda: _solid("I;16N", 1000), (4, 4, 4)),
    ("I 16-bit data", lambda: _solid("I", 1000), (4, 4, 4)),
    ("I 16-bit full", lambda: _solid("I", 65535), WHITE),
    ("I 32-bit data", lambda: _solid("I", 2**30), (128, 128, 128)),
    ("I negative", lambda: _solid("I", -5), (0, 0, 0)),
    ("F unit range", lambda: _solid("F", 0.25), (64, 64, 64)),
    ("F 0-255 range", lambda: _solid("F", 200.0), (200, 200, 200)),
    ("RGB", lambda: _solid("RGB", (10, 20, 30)), (10, 20, 30)),
    ("RGB with transparent key", lambda: _with_key(_solid("RGB", (10, 20, 30)), (10, 20, 30)), WHITE),
    ("RGBA opaque", lambda: _solid("RGBA", (200, 100, 0, 255)), (200, 100, 0)),
    ("RGBA transparent", lambda: _solid("RGBA", (0, 0, 0, 0)), WHITE),
    ("RGBA half", lambda: _solid("RGBA", (0, 0, 0, 128)), (127, 127, 127)),
    ("RGBa half (premultiplied)", lambda: _solid("RGBa", (100, 50, 0, 128)), (227, 177, 127)),
    ("RGBX", lambda: _solid("RGBX", (1, 2, 3, 0)), (1, 2, 3)),
    ("CMYK no ink", lambda: _solid("CMYK", (0, 0, 0, 0)), WHITE),
    ("CMYK cyan", lambda: _solid("CMYK", (255, 0, 0, 0)), (0, 255, 255)),
    ("YCbCr white", lambda: _solid("YCbCr", (255, 128, 128)), WHITE),
    ("YCbCr gray", lambda: _solid("YCbCr", (100, 128, 128)), (100, 100, 100)),
    ("HSV red", lambda: _solid("HSV", (0, 255, 255)), (255, 0, 0)),
]


def _assert_rgb(img: Image.Image, expected: tuple[int, int, int], tol: int = 1) -> None:
    assert img.mode == "RGB"
    px = img.getpixel((5, 5))
    assert isinstance(px, tuple)
    assert all(abs(a - b) <= tol for a, b in zip(px, expected, strict=True)), (px, expected)


@pytest.mark.parametrize(("name", "make", "expected"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_converts_to_viewer_rgb(name: str, make: object, expected: tuple[int, int, int]) -> None:
    from bots.images import to_display_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning may escape either
        _assert_rgb(to_display_rgb(make()), expected)  # type: ignore[operator]


def _stored_rgb(data: bytes) -> Image.Image:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = load_image(data, LIM)
    assert not caught, [str(w.message) for w in caught]
    return Image.open(io.BytesIO(v.png_bytes))


def _encode(img: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_16bit_grayscale_png_near_black_is_stored_near_black() -> None:
    import numpy as np

    arr = np.full((24, 32), 1000, dtype=np.uint16)
    arr[0:4, 0:4] = 65535
    data = _encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    stored = _stored_rgb(data)
    _assert_rgb(stored, (4, 4, 4))
    assert stored.getpixel((1, 1)) == WHITE


FILE_CASES = [
    ("1", _encode(_solid("1", 0)), (0, 0, 0)),
    ("L", _encode(_solid("L", 90)), (90, 90, 90)),
    ("LA transparent", _encode(_solid("LA", (0, 0))), WHITE),
    ("P transparent index", _encode(_palette(), transparency=1), WHITE),
    ("P transparency bytes", _encode(_palette(), transparency=bytes([255, 0])), WHITE),
    ("I;16 with tRNS", _encode(_solid("I;16", 1000), transparency=1000), WHITE),
    ("RGB with tRNS", _encode(_solid("RGB", (10, 20, 30)), transparency=(10, 20, 30)), WHITE),
    ("RGBA transparent", _encode(_solid("RGBA", (0, 0, 0, 0))), WHITE),
    ("RGBA half webp", _encode(_solid("RGBA", (0, 0, 0, 128)), "WEBP", lossless=True), (127, 127, 127)),
    ("CMYK jpeg", _encode(_solid("CMYK", (0, 0, 0, 0)), "JPEG", quality=95), WHITE),
    ("L jpeg", _encode(_solid("L", 90), "JPEG", quality=95), (90, 90, 90)),
]


@pytest.mark.parametrize(("name", "data", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_stored_rgb_of_real_files(name: str, data: bytes, expected: tuple[int, int, int]) -> None:
    _assert_rgb(_stored_rgb(data), expected, tol=2)


def test_oversized_png_text_chunk_gets_an_accurate_message() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1024), zip=True)
    data = _encode(Image.new("RGB", (32, 32)), pnginfo=info)
    with pytest.raises(ImageRejected) as caught:
        load_image(data, LIM)
    assert "text" in caught.value.message and "corrupt" not in caught.value.message
