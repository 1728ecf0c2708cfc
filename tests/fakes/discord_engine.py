"""A fast stand-in engine for the Discord end-to-end tests (plugged in with TURBOBOT_ENGINE_FACTORY).

It writes a real, small H.264 mp4 (seeded noise, so re-encoding it smaller is real work for ffmpeg) and
reports progress per step. A prompt containing "[hold]" keeps the job running until it is cancelled, so a
cancel test needs no timing; "[fail]" fails the job with a user-facing message; "[flat]" renders one flat
colour (a tiny first-frame preview); "[phases]" stops in the text, decode and encode phases until the test
opens a gate (``wait_gate``), so the status shown in each phase can be checked without timing; "[preview]"
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

SIDE = 64
FPS = 16
HOLD_LIMIT_S = 30.0
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
    def __init__(self, settings: object) -> None:
        self.settings = settings

    @property
    def info(self) -> dict[str, object]:
        return {"models": ["tiny-t2v", "tiny-i2v"], "device": "cpu", "attention": "none"}

    def load(self) -> None:
        pass

    def render(self, job: RenderJob, *, progress: Callable[[Progress], None],
               cancelled: Callable[[], bool]) -> RenderResult:
        req = job.request
        started = time.monotonic()
        if "[fail]" in req.prompt:
            raise EngineError("The test engine was asked to fail.")
        if "[hold]" in req.prompt:
            progress(Progress("denoise", 0, req.steps))
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not cancelled():
                if time.monotonic() > deadline:
                    raise EngineError("held too long without a cancel")
                time.sleep(0.01)
            raise JobCancelled
        phases = "[phases]" in req.prompt
        if phases:
            progress(Progress("text", 0, req.steps))
            wait_gate(job.job_id, "text", cancelled)
        for step in range(1, req.steps + 1):
            if cancelled():
                raise JobCancelled
            # Previews as the real engine makes them: when asked for, after every step but the last.
            with_preview = job.preview_interval_s is not None and step < req.steps
            progress(Progress("denoise", step, req.steps, step_seconds=0.001,
                              preview=preview_frames(step) if with_preview else None))
            if with_preview and "[preview]" in req.prompt:
                wait_gate(job.job_id, f"preview{step}", cancelled)
        if phases:
            progress(Progress("decode", req.steps, req.steps))
            wait_gate(job.job_id, "decode", cancelled)
            progress(Progress("encode", req.steps, req.steps))
            wait_gate(job.job_id, "encode", cancelled)
        frames = min(req.frames, 17)
        rng = np.random.default_rng(req.seed or 0)
        if "[flat]" in req.prompt:
            video = np.full((frames, SIDE, SIDE, 3), 90, dtype=np.uint8)
        else:
            video = rng.integers(0, 256, size=(frames, SIDE, SIDE, 3), dtype=np.uint8)
        out = Path(job.output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = imageio_ffmpeg.write_frames(str(out), (SIDE, SIDE), fps=FPS, codec="libx264", quality=10,
                                             macro_block_size=16, output_params=["-f", "mp4"])
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        data = out.read_bytes()
        model = req.model or "tiny-t2v"
        return RenderResult(
            path=out, width=SIDE, height=SIDE, frames=frames, fps=FPS, duration_s=frames / FPS, bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), model_label=f"{model} (test engine)", is_demo=True,
            timings={"total": time.monotonic() - started},
        )


def create(settings: object) -> FastEngine:
    return FastEngine(settings)
