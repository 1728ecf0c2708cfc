"""mp4 output: real H.264 yuv420p files with the index first, fit-to-size, thumbnails, safe names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator import media as video


def gradient_frames(n: int, w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, None, :, None]
    y = np.linspace(0, 255, h)[None, :, None, None]
    t = np.arange(n)[:, None, None, None] * 8
    rgb = np.concatenate([np.broadcast_to(x + t, (n, h, w, 1)), np.broadcast_to(y + 0 * t, (n, h, w, 1)),
                          np.broadcast_to((x + y) / 2 + 0 * t, (n, h, w, 1))], axis=-1)
    return (rgb % 256).astype(np.uint8)


def noise_frames(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_write_mp4_is_playable_h264_with_all_frames(tmp_path: Path) -> None:
    frames = gradient_frames(9, 64, 48)
    out = video.write_mp4(frames, tmp_path / "a.mp4")
    info = video.probe(out)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.frames) == ("h264", "yuv420p", 64, 48, 9)
    assert info.fps == 16 and info.faststart and info.duration_s == pytest.approx(9 / 16, abs=0.07)
    assert video.is_playable_h264(out)
    back = video.decode_frames(out)
    assert back.shape == (9, 48, 64, 3)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy, but the same picture
    assert not list(tmp_path.glob(".enc-*"))  # no temp file left


def test_odd_sizes_are_cropped_to_even(tmp_path: Path) -> None:
    info = video.probe(video.write_mp4(gradient_frames(5, 65, 49), tmp_path / "odd.mp4"))
    assert (info.width, info.height, info.frames) == (64, 48, 5)


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        video.write_mp4(np.zeros((3, 16, 16, 3), dtype=np.float32), tmp_path / "x.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"nonsense" * 50)
    assert not video.is_playable_h264(garbage)


def test_fit_to_size_shrinks_below_the_limit(tmp_path: Path) -> None:
    src = video.write_mp4(noise_frames(17, 160, 96), tmp_path / "big.mp4")
    size = src.stat().st_size
    limit = size // 3
    out = video.fit_to_size(src, tmp_path / "small.mp4", limit)
    assert out is not None and out.stat().st_size <= limit
    assert video.is_playable_h264(out) and video.probe(out).frames == 17
    assert video.fit_to_size(src, tmp_path / "never.mp4", 300) is None
    assert not (tmp_path / "never.mp4").exists() and not list(tmp_path.glob(".fit-*"))


def test_fit_to_size_copies_when_it_already_fits(tmp_path: Path) -> None:
    src = video.write_mp4(gradient_frames(5, 64, 48), tmp_path / "ok.mp4")
    out = video.fit_to_size(src, tmp_path / "copy.mp4", src.stat().st_size)
    assert out is not None and out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("name", ["thumb.png", "thumb.jpg"])
def test_thumbnail_is_the_first_frame(tmp_path: Path, name: str) -> None:
    frames = gradient_frames(5, 64, 48)
    frames[0] = 200  # a light first frame, unlike the rest
    src = video.write_mp4(frames, tmp_path / "t.mp4")
    thumb = video.thumbnail(src, tmp_path / name)
    with Image.open(thumb) as im:
        assert im.size == (64, 48)
        assert abs(np.asarray(im.convert("RGB"), dtype=float).mean() - 200) < 8


def test_output_name_is_server_made_and_safe() -> None:
    assert video.video_file_name("t2v", 123, 42, "tiny-t2v") == "t2v_123_42_tiny-t2v.mp4"
    name = video.video_file_name("i2v", 7, 9, "../../Evil Model!/x")
    assert name.startswith("i2v_7_9_") and name.endswith(".mp4")
    assert "/" not in name and " " not in name and ".." not in name
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")
    assert video.video_file_name("weird", 1, 2, "") == "video_1_2_model.mp4"


def test_streamed_chunks_make_the_same_video_and_abort_leaves_nothing(tmp_path: Path) -> None:
    frames = gradient_frames(9, 64, 48)
    with video.Mp4Writer(tmp_path / "s.mp4") as w:
        w.write(frames[:1])
        w.write(frames[1])  # a single [H, W, 3] frame
        w.write(frames[2:])
        out = w.close()
    assert w.frames == 9 and w.size == (64, 48)
    np.testing.assert_array_equal(video.decode_frames(out), video.decode_frames(video.write_mp4(frames, tmp_path / "a.mp4")))
    with pytest.raises(RuntimeError), video.Mp4Writer(tmp_path / "gone.mp4") as w2:
        w2.write(frames[:3])
        raise RuntimeError("decode failed")
    with pytest.raises(ValueError):
        video.Mp4Writer(tmp_path / "x.mp4").write(gradient_frames(2, 32, 32)[:, :, :, :2])
    assert not (tmp_path / "gone.mp4").exists() and not list(tmp_path.glob(".enc-*"))
