"""A fast stand-in engine for chat front-end tests, loaded by the worker process through
``TURBOBOT_ENGINE_FACTORY=/path/to/this/file.py:make_engine``.

It writes a real (tiny) H.264 mp4 in a fraction of a second, reports one progress event per step, and
obeys a few words in the prompt so tests can steer it: ``hold`` keeps the job running until it is
cancelled, ``fail`` makes it fail with a user-facing message, ``big`` writes a noisy video of a few hundred
kilobytes (to exercise the upload size limit), ``[phases]`` stops in the text, decode and encode phases
until the test opens a gate (``wait_gate``), so each phase's status can be checked without timing; ``[preview]``
stops after each live preview (when previews are on) until the gate ``preview<step>`` opens.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from generator.engine.api import EngineError, JobCancelled, Progress, RenderJob, RenderResult
from turbobot.config import Settings

FPS = 16
GATES_ENV = "TURBOBOT_TEST_GATES"


def wait_gate(job_id: int, name: str, cancelled: Callable[[], bool]) -> None:
    """A "[phases]" job stays in its current phase until the test creates ``$TURBOBOT_TEST_GATES/<job>-<name>``
    (polling ``cancelled`` keeps the worker's watchdog fed). Bounded, so a broken test cannot hang it."""
    folder = os.environ.get(GATES_ENV)
    if not folder:
        return
    gate = Path(folder) / f"{job_id}-{name}"
    deadline = time.monotonic() + 30.0
    while not gate.exists() and time.monotonic() < deadline:
        if cancelled():
            raise JobCancelled
        time.sleep(0.01)


def preview_frames(step: int) -> np.ndarray:
    """What a real engine hands out as a live preview: a few small uint8 RGB frames (a moving gradient)."""
    frames = np.zeros((4, 36, 64, 3), dtype=np.uint8)
    for i in range(4):
        frames[i, :, :, 0] = (np.arange(64) * 4 + i * 30 + step * 50) % 256
        frames[i, :, :, 2] = 40 * step
    return frames


class FastEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def info(self) -> dict[str, object]:
        return {"engine": "fast-test", "device": "cpu"}

    def load(self) -> None:
        pass

    def render(
        self, job: RenderJob, *, progress: Callable[[Progress], None], cancelled: Callable[[], bool]
    ) -> RenderResult:
        t0 = time.monotonic()
        req = job.request
        total = req.steps
        progress(Progress("text", 0, total))
        phases = "[phases]" in req.prompt
        if phases:
            wait_gate(job.job_id, "text", cancelled)
        if "hold" in req.prompt:
            deadline = time.monotonic() + 20.0
            while not cancelled():
                if time.monotonic() > deadline:
                    raise EngineError("held too long (test engine)")
                time.sleep(0.02)
            raise JobCancelled()
        if "fail" in req.prompt:
            raise EngineError("The test engine was asked to fail.", code="test_failure")
        for step in range(1, total + 1):
            if cancelled():
                raise JobCancelled()
            # Previews as the real engine makes them: when asked for, after every step but the last.
            with_preview = job.preview_interval_s is not None and step < total
            progress(Progress("denoise", step, total, step_seconds=0.001,
                              preview=preview_frames(step) if with_preview else None))
            if with_preview and "[preview]" in req.prompt:
                wait_gate(job.job_id, f"preview{step}", cancelled)
        if phases:
            progress(Progress("decode", total, total))
            wait_gate(job.job_id, "decode", cancelled)
            progress(Progress("encode", total, total))
            wait_gate(job.job_id, "encode", cancelled)
        big = "big" in req.prompt
        width, height, frames = (128, 128, 17) if big else (64, 48, 9)
        rng = np.random.default_rng(req.seed)
        writer = imageio_ffmpeg.write_frames(
            str(job.output_path), (width, height), fps=FPS, codec="libx264", quality=8 if big else 5,
            macro_block_size=16, ffmpeg_log_level="error", output_params=["-preset", "ultrafast"],
        )
        writer.send(None)
        for i in range(frames):
            if big:
                frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                frame = np.full((height, width, 3), (i * 20) % 256, dtype=np.uint8)
            writer.send(frame.tobytes())
        writer.close()
        data = Path(job.output_path).read_bytes()
        model = req.model or "tiny-t2v"
        return RenderResult(
            path=Path(job.output_path),
            width=width,
            height=height,
            frames=frames,
            fps=FPS,
            duration_s=frames / FPS,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            model_label=model,
            is_demo=model.startswith("tiny"),
            timings={"total": time.monotonic() - t0},
        )


def make_engine(settings: Settings) -> FastEngine:
    return FastEngine(settings)
