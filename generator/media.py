"""Video files, shared by the engine, the scheduler and the front ends: frames -> H.264 mp4 through
imageio-ffmpeg's bundled ffmpeg, probing, playability checks, fit-to-size re-encodes, thumbnails and the
server-made output file names.

Every mp4 is H.264 (libx264) in yuv420p with ``+faststart`` (the index first, so chat clients stream it
before the download ends). Raw RGB frames are piped to ffmpeg's stdin; nothing goes through a shell.
Needs numpy and ffmpeg only: imports nothing of this project (no torch), so front ends can use it cheaply.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FPS = 16
DEFAULT_CRF = 19
# Streaming encodes: no lookahead and no B-frames, so each frame is encoded as it arrives and the file is done
# a few ms after the last one (the "tail"; bench/mp4_tail.py, bench/RESULTS.md: 0.02-0.07 s at 480p against
# 0.17-1.3 s with x264's defaults). veryfast keeps files no larger than "fast" without them.
DEFAULT_PRESET = "veryfast"
STREAMING_X264 = "rc-lookahead=0:sync-lookahead=0:bframes=0"
_TIMEOUT_S = 600


class VideoError(RuntimeError):
    """ffmpeg failed or a file is not the video it should be."""


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run(args: list[str], *, timeout: float = _TIMEOUT_S) -> str:
    """Run ffmpeg with ``args``; returns stderr text; raises VideoError on failure."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", *args], capture_output=True, timeout=timeout, check=False,
    )
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise VideoError(f"ffmpeg failed ({proc.returncode}): {err.strip()[-500:]}")
    return err


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: drop a last odd row/column."""
    _, h, w, _ = frames.shape
    return frames[:, : h - h % 2, : w - w % 2]


def _x264_args(crf: int, preset: str, params: str = "") -> list[str]:
    extra = ["-x264-params", params] if params else []
    return ["-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), *extra, "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4"]


ENCODE_TEMP_MARK = ".enc-"  # between the target's stem and a random part in the name of a file being encoded


class Mp4Writer:
    """Stream uint8 RGB frames into ffmpeg as they are produced (so encoding overlaps the VAE decode).

    ``write`` takes [H, W, 3] or [F, H, W, 3] chunks; ffmpeg starts at the first chunk (its size fixes the
    video's). ``close`` finishes the file and renames it into place atomically; ``abort`` kills ffmpeg and
    leaves nothing behind. Usable as a context manager (aborts on an exception).
    """

    def __init__(self, path: str | Path, *, fps: int = FPS, crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET) -> None:
        self.path = Path(path)
        self.fps, self.crf, self.preset = fps, crf, preset
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (width, height) after even cropping
        self._proc: subprocess.Popen[bytes] | None = None
        self._err: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def _start(self, w: int, h: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Named after the target, so a process killed mid-encode leaves a file whose owner is still known
        # (the scheduler's sweep matches ``<target stem>.enc-*`` to the job of a worker's partial file).
        stem = self.path.stem if self.path.stem.startswith(".") else "." + self.path.stem
        fd, tmp_name = tempfile.mkstemp(prefix=f"{stem}{ENCODE_TEMP_MARK}", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp_name)
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
             "-s", f"{w}x{h}", "-r", str(self.fps), "-i", "-", *_x264_args(self.crf, self.preset, STREAMING_X264), str(self._tmp)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err,
        )
        self.size = (w, h)

    def write(self, frames: np.ndarray) -> None:
        arr = frames[None] if frames.ndim == 3 else frames
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {arr.dtype} {arr.shape}")
        arr = _even(arr)
        _, h, w, _ = arr.shape
        if self._proc is None:
            if h < 2 or w < 2:
                raise ValueError(f"frames of {w}x{h} are too small for H.264")
            self._start(w, h)
        elif self.size != (w, h):
            raise ValueError(f"frame size changed from {self.size} to {(w, h)}")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(arr).tobytes())
        except BrokenPipeError:
            self._fail()  # ffmpeg died: say why
        self.frames += arr.shape[0]

    def _fail(self) -> None:
        rc = self._proc.wait(timeout=_TIMEOUT_S) if self._proc else None
        msg = ""
        if self._err is not None:
            self._err.seek(0)
            msg = self._err.read().decode("utf-8", "replace").strip()
        self.abort()
        raise VideoError(f"ffmpeg could not encode the video ({rc}): {msg[-500:]}")

    def close(self) -> Path:
        if self._proc is None or self._tmp is None:
            raise ValueError("no frames were written")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self._proc.wait(timeout=_TIMEOUT_S)
        if rc != 0 or self._tmp.stat().st_size == 0:
            self._fail()
        os.replace(self._tmp, self.path)
        self._tmp = None
        self._cleanup()
        return self.path

    def abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _cleanup(self) -> None:
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.close()
        if self._err is not None:
            self._err.close()
            self._err = None


def write_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    path: str | Path,
    *,
    fps: int = FPS,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> Path:
    """Encode uint8 RGB frames ([F, H, W, 3] array, or an iterable of [H, W, 3] / [f, H, W, 3] chunks) to an
    H.264 mp4 at ``path``. The file appears atomically (written next to it, then renamed)."""
    with Mp4Writer(path, fps=fps, crf=crf, preset=preset) as writer:
        if isinstance(frames, np.ndarray):
            writer.write(frames)
        else:
            for chunk in frames:
                writer.write(chunk)
        return writer.close()


# --------------------------------------------------------------------------------------------------
# Inspecting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    faststart: bool  # moov box before mdat
    bytes: int


_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+)[^,\n]*, (?P<pix>[a-z0-9_]+)(?:\([^)\n]*\))?, "
                     r"(?P<w>\d+)x(?P<h>\d+)")
_FPS = re.compile(r"Video: [^\n]*?(?P<fps>\d+(?:\.\d+)?) fps")
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_FRAMES = re.compile(r"frame=\s*(\d+)")


def mp4_boxes(path: str | Path) -> list[str]:
    """Top-level box types of an ISO-BMFF file, in order."""
    types: list[str] = []
    with open(path, "rb") as f:
        size_total = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 8 <= size_total:
            f.seek(pos)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
            elif size == 0:
                size = size_total - pos
            if size < 8:
                raise VideoError(f"{path}: corrupt mp4 box at byte {pos}")
            types.append(kind.decode("latin-1"))
            pos += size
    return types


def probe(path: str | Path) -> VideoInfo:
    """Codec, pixel format, size, fps, frame count (by reading every packet) and layout of a video file."""
    p = Path(path)
    if not p.is_file():
        raise VideoError(f"{p} does not exist")
    err = _run(["-i", str(p), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"])
    stream = _STREAM.search(err)
    if stream is None:
        raise VideoError(f"{p} has no video stream")
    fps_m = _FPS.search(err)
    dur_m = _DURATION.search(err)
    frames = [int(x) for x in _FRAMES.findall(err)]
    duration = 0.0
    if dur_m:
        hh, mm, ss = dur_m.groups()
        duration = int(hh) * 3600 + int(mm) * 60 + float(ss)
    boxes = mp4_boxes(p)
    faststart = "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat")
    return VideoInfo(
        codec=stream.group("codec"), pix_fmt=stream.group("pix"), width=int(stream.group("w")),
        height=int(stream.group("h")), fps=float(fps_m.group("fps")) if fps_m else 0.0,
        frames=frames[-1] if frames else 0, duration_s=duration, faststart=faststart, bytes=p.stat().st_size,
    )


def decode_frames(path: str | Path) -> np.ndarray:
    """Decode a video back to uint8 RGB [F, H, W, 3] (used to check outputs really play)."""
    info = probe(path)
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path), "-map", "0:v:0",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, timeout=_TIMEOUT_S, check=False,
    )
    if proc.returncode != 0:
        raise VideoError(f"cannot decode {path}: {proc.stderr.decode('utf-8', 'replace')[-300:]}")
    frame_bytes = info.width * info.height * 3
    if frame_bytes == 0 or len(proc.stdout) % frame_bytes:
        raise VideoError(f"{path}: decoded {len(proc.stdout)} bytes, not whole {info.width}x{info.height} frames")
    return np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, info.height, info.width, 3)


def is_playable_h264(path: str | Path) -> bool:
    """True for an H.264 yuv420p mp4 with the index first whose every packet decodes."""
    try:
        info = probe(path)
        _run(["-v", "error", "-xerror", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"])
    except VideoError:
        return False
    return info.codec == "h264" and info.pix_fmt == "yuv420p" and info.faststart and info.frames > 0


# --------------------------------------------------------------------------------------------------
# Derived files
# --------------------------------------------------------------------------------------------------

# (scale of each side, crf): quality first, then size. Each rung is tried only while it can still fit.
_FIT_LADDER: tuple[tuple[float, int], ...] = (
    (1.0, 26), (1.0, 32), (1.0, 38), (0.75, 38), (0.5, 38), (0.5, 44), (0.35, 46), (0.25, 51),
)


def _predicted_bytes(last: tuple[float, int, int], scale: float, crf: int) -> float:
    """Rough size model from the previous attempt: x0.5 per +6 crf, proportional to the area."""
    last_scale, last_crf, last_bytes = last
    return last_bytes * (0.5 ** ((crf - last_crf) / 6.0)) * (scale / last_scale) ** 2


def _reencode(src: Path, dst: Path, *, scale: float, crf: int, width: int, height: int) -> None:
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    vf = ["-vf", f"scale={w}:{h}:flags=area"] if scale != 1.0 else []
    _run(["-loglevel", "error", "-y", "-i", str(src), "-map", "0:v:0", *vf, *_x264_args(crf, "medium"), str(dst)])


def fit_to_size(src: str | Path, dst: str | Path, max_bytes: int) -> Path | None:
    """A copy of ``src`` at ``dst`` no larger than ``max_bytes``: as is when it fits, else re-encoded with a
    higher crf (lower quality), then downscaled. None when even the smallest rung does not fit."""
    s, d = Path(src), Path(dst)
    if max_bytes <= 0:
        return None
    if s.stat().st_size <= max_bytes:
        if s.resolve() != d.resolve():
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, d)
        return d
    info = probe(s)
    last = (1.0, DEFAULT_CRF, info.bytes)
    d.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".fit-", suffix=".mp4", dir=d.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for i, (scale, crf) in enumerate(_FIT_LADDER):
            is_last = i == len(_FIT_LADDER) - 1
            if min(info.width, info.height) * scale < 32 and not is_last:
                continue
            # Skip rungs the size model says are hopeless (4x over), but always try the final one.
            if not is_last and _predicted_bytes(last, scale, crf) > 4 * max_bytes:
                continue
            _reencode(s, tmp, scale=scale, crf=crf, width=info.width, height=info.height)
            size = tmp.stat().st_size
            if size <= max_bytes:
                os.replace(tmp, d)
                return d
            last = (scale, crf, size)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def thumbnail(src: str | Path, dst: str | Path, *, max_side: int | None = None) -> Path:
    """First frame of ``src`` as PNG or JPEG (by ``dst``'s suffix), optionally shrunk to ``max_side``."""
    d = Path(dst)
    suffix = d.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"thumbnail must be .png or .jpg, got {d.name}")
    d.parent.mkdir(parents=True, exist_ok=True)
    vf = ["-vf", f"scale='min({max_side},iw)':-2"] if max_side else []
    quality = ["-q:v", "3"] if suffix != ".png" else []
    _run(["-loglevel", "error", "-y", "-i", str(src), "-map", "0:v:0", "-frames:v", "1", *vf, *quality,
          "-update", "1", str(d)])
    if not d.is_file() or d.stat().st_size == 0:
        raise VideoError(f"no thumbnail could be made from {src}")
    return d


_SAFE = re.compile(r"[^a-z0-9.\-]+")


def video_file_name(mode: str, job_id: int, seed: int, model: str, *, ext: str = "mp4") -> str:
    """Server-made file name ``{mode}_{job}_{seed}_{model}.{ext}``: only [a-z0-9._-], never user text."""
    m = mode if mode in ("t2v", "i2v") else "video"
    slug = _SAFE.sub("-", str(model).lower()).strip("-.")[:40] or "model"
    return f"{m}_{int(job_id)}_{int(seed)}_{slug}.{ext}"
