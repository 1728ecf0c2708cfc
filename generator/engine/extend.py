"""Extend a video: its last frame (the input of the I2V continuation) and the joined result (the original
followed by the continuation, the shared frame once), re-encoded as one H.264 yuv420p faststart mp4.

Light on purpose (numpy, Pillow, the bundled ffmpeg; no torch): the scheduler takes the last frame in the
service process and the worker joins after rendering.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from generator.media import FPS, decode_frames, write_mp4


def last_frame_png(path: str | Path) -> tuple[bytes, int, int]:
    """The video's last frame as PNG bytes, with its width and height."""
    from PIL import Image

    frame = decode_frames(path)[-1]
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue(), int(frame.shape[1]), int(frame.shape[0])


def _resized(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames])


def join_videos(first: str | Path, then: str | Path, out: str | Path, *, fps: int = FPS) -> tuple[int, int, int]:
    """Write ``first`` followed by ``then`` without its first frame (it continues from ``first``'s last) to
    ``out``; ``then`` is scaled to ``first``'s size if the two differ. Returns (frames, width, height)."""
    head = decode_frames(first)
    tail = decode_frames(then)[1:]
    height, width = int(head.shape[1]), int(head.shape[2])
    if len(tail):
        tail = _resized(tail, width, height)
    write_mp4(np.concatenate([head, tail]) if len(tail) else head, out, fps=fps)
    return len(head) + len(tail), width, height
