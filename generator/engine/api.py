"""The engine's contract with the scheduler's worker process.

The worker builds one ``Engine`` per process (``generator.engine.create_engine(options)``), then calls
``render`` once per job. The engine knows nothing of chat or SQL: it gets a validated request, a seed, a
local image path and an output path, and reports progress through a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from generator.request import GenerationRequest


class EngineError(Exception):
    """A job failed for a reason a user can be told. ``code`` is a stable machine-readable tag."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.user_message = message
        if code:
            self.code = code


class ModelNotConfigured(EngineError):
    code = "model_not_configured"


class CheckpointError(EngineError):
    """A weights file is missing, truncated or of another kind than configured."""

    code = "bad_checkpoint"


class OutOfMemory(EngineError):
    """CUDA ran out of memory even after the engine's fallbacks (tiled decode)."""

    code = "out_of_memory"


class JobCancelled(Exception):
    """Raised between sampler steps when the job's ``cancelled()`` callback returns True."""


@dataclass(frozen=True)
class RenderJob:
    job_id: int
    request: GenerationRequest  # validated; request.seed is set
    image_path: Path | None = None  # local, already validated image for i2v
    output_path: Path = Path("out.mp4")  # where to write the mp4 (the worker renames it afterwards)
    decoder: str | None = None  # final decode: "vae", "tiny" (fast draft), None = the model's ``decoder`` setting
    # Live previews: at most one per this many seconds, after a denoise step other than the last; None = off.
    preview_interval_s: float | None = None


Stage = Literal["text", "denoise", "decode", "encode"]


@dataclass(frozen=True)
class Progress:
    stage: Stage  # reported on entering each stage, and after every denoise step
    step: int  # steps done in the denoise stage (0..total)
    total: int
    step_seconds: float | None = None  # duration of the step just finished
    # With some denoise steps (see ``RenderJob.preview_interval_s``): the step's x0 estimate as a few small
    # frames, uint8 numpy [F, H, W, 3] on the CPU (``generator.engine.preview``); the receiver encodes it.
    preview: Any = None


@dataclass
class RenderResult:
    path: Path
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float
    bytes: int
    sha256: str
    model_label: str
    is_demo: bool  # True for the embedded untrained model: front ends must say so
    timings: dict[str, float] = field(default_factory=dict)  # text, denoise, per-step, decode, encode, total


class Engine(Protocol):
    @property
    def info(self) -> dict[str, object]:
        """Model names and labels, device, attention in use, GPU memory: shown by /readyz and the console."""

    def load(self) -> None:
        """Load (or build) models now; called once at worker start so the first job is fast."""

    def warm_up(self) -> None:
        """Compile and tune for the shapes the configuration allows, after ``load`` and before the worker
        reports ready (a no-op where nothing is compiled, e.g. on the CPU)."""

    def render(
        self,
        job: RenderJob,
        *,
        progress: Callable[[Progress], None],
        cancelled: Callable[[], bool],
    ) -> RenderResult:
        """Render one video to ``job.output_path``. Raises EngineError subclasses or JobCancelled."""
