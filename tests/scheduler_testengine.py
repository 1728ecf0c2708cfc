"""A fast stand-in engine for the scheduler tests (implements ``generator.engine.api.Engine``).

It writes a tiny real H.264 mp4: a clip made once by ffmpeg (path in ``$TURBOBOT_TEST_MP4``) followed by an
MP4 ``free`` box carrying the job id and seed, so every output is playable and has its own sha256.
Behaviour is chosen by words in the prompt:
  oom      raise the real ``torch.cuda.OutOfMemoryError``
  cudafail raise a CUDA-style RuntimeError (the worker must exit and be restarted)
  enginefail  raise ``EngineError`` with a user message
  bug      raise ValueError (an unexpected error)
  hold     after the first step, wait until ``cancelled()`` says yes (or 60 s), checking every 5 ms
  stall    stop calling back for ``$TURBOBOT_TEST_STALL_SECONDS`` (the watchdog test)
  gil      before the first step, hold the interpreter lock in back-to-back C calls of ~0.3 s for
           ``$TURBOBOT_TEST_GIL_SECONDS`` (default 3): what importing torch or a gc pass does to the
           worker's other threads (event loop, database driver)
``$TURBOBOT_TEST_STEP_SECONDS`` is the sleep per sampler step (default 0.01).
``$TURBOBOT_TEST_WARMUP_FILE``: ``warm_up`` waits (up to 60 s) until that file exists.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from generator.engine.api import EngineError, JobCancelled, Progress, RenderJob, RenderResult

MP4_ENV = "TURBOBOT_TEST_MP4"


def make_base_mp4(path: Path) -> Path:
    import imageio_ffmpeg

    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi",
            "-i", "color=c=red:s=64x64:d=0.3125:r=16", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", str(path),
        ],
        check=True,
        timeout=60,
    )
    return path


class FastEngine:
    def __init__(self) -> None:
        self.base = b""
        self.step_seconds = float(os.environ.get("TURBOBOT_TEST_STEP_SECONDS", "0.01"))
        self.stall_seconds = float(os.environ.get("TURBOBOT_TEST_STALL_SECONDS", "30"))

    @property
    def info(self) -> dict[str, object]:
        return {"model": "test", "device": "cpu", "attention": "none"}

    def load(self) -> None:
        self.base = Path(os.environ[MP4_ENV]).read_bytes()

    def warm_up(self) -> None:
        gate = os.environ.get("TURBOBOT_TEST_WARMUP_FILE")
        deadline = time.monotonic() + 60
        while gate and not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def render(
        self, job: RenderJob, *, progress: Callable[[Progress], None], cancelled: Callable[[], bool]
    ) -> RenderResult:
        words = set(job.request.prompt.lower().split())
        t0 = time.monotonic()
        steps = job.request.steps
        progress(Progress("text", 0, steps))
        if "oom" in words:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")
        if "cudafail" in words:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test)")
        if "enginefail" in words:
            raise EngineError("The test engine refuses this prompt.", code="test_refused")
        if "bug" in words:
            raise ValueError("an unexpected bug (test)")
        if "gil" in words:
            hog_until = time.monotonic() + float(os.environ.get("TURBOBOT_TEST_GIL_SECONDS", "3"))
            while time.monotonic() < hog_until:
                sum(range(20_000_000))  # one C call (~0.3 s): no thread switch until it returns
        progress(Progress("denoise", 0, steps))
        for step in range(1, steps + 1):
            if cancelled():
                raise JobCancelled()
            ts = time.monotonic()
            if self.step_seconds:
                time.sleep(self.step_seconds)
            if "stall" in words:
                time.sleep(self.stall_seconds)
            if "hold" in words and step == 1:
                deadline = time.monotonic() + 60
                while not cancelled() and time.monotonic() < deadline:
                    time.sleep(0.005)
            progress(Progress("denoise", step, steps, step_seconds=time.monotonic() - ts))
        if cancelled():
            raise JobCancelled()
        progress(Progress("decode", steps, steps))
        payload = f"job={job.job_id} seed={job.request.seed} prompt={job.request.prompt}".encode()
        if job.image_path is not None:  # the input reached this worker: its digest is in the video
            payload += f" image={hashlib.sha256(Path(job.image_path).read_bytes()).hexdigest()}".encode()
        data = self.base + struct.pack(">I", 8 + len(payload)) + b"free" + payload
        with open(job.output_path, "wb") as fh:
            fh.write(data)
        return RenderResult(
            path=job.output_path, width=64, height=64, frames=5, fps=16, duration_s=0.3125, bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), model_label="test engine", is_demo=True,
            timings={"total": time.monotonic() - t0},
        )


def make_engine(settings: object) -> FastEngine:
    return FastEngine()


def broken_engine(settings: object) -> FastEngine:
    from generator.engine.api import ModelNotConfigured

    raise ModelNotConfigured("No weights at /nowhere/model.pth (test).")
