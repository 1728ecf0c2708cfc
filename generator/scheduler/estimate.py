"""Run-time estimates from measured step times (moving averages kept per worker in ``workers.info``).

The worker updates a ``StepStats`` after every job and stores ``to_dict()`` in its worker row; the scheduler
merges the rows of all workers to estimate when a running or queued job will finish. Times are keyed by
shape (model, size, frames); an unseen shape is scaled from the per-megapixel-frame rate of seen ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from generator.request import SIZES, GenerationRequest

ALPHA = 0.3  # weight of the newest measurement


@dataclass(frozen=True)
class Shape:
    model: str
    width: int
    height: int
    frames: int
    steps: int

    @property
    def key(self) -> str:
        return f"{self.model}|{self.width}x{self.height}|{self.frames}"

    @property
    def mpf(self) -> float:
        """Megapixel-frames: the unit work scales with."""
        return max(self.width * self.height * self.frames / 1e6, 1e-6)

    @classmethod
    def of(cls, model: str, resolution: str, aspect: str, frames: int, steps: int) -> Shape:
        width, height = SIZES.get((resolution, aspect), (832, 480))
        return cls(model or "", width, height, int(frames), int(steps))

    @classmethod
    def from_request(cls, request: GenerationRequest) -> Shape:
        return cls.of(request.model or "", request.resolution, request.aspect, request.frames, request.steps)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


@dataclass
class StepStats:
    step: dict[str, float] = field(default_factory=dict)  # seconds per sampler step, by shape key
    pre: dict[str, float] = field(default_factory=dict)  # before the first step (text encoding, setup)
    post: dict[str, float] = field(default_factory=dict)  # after the last step (VAE decode, mp4 encode)
    step_rate: float | None = None  # seconds per step per megapixel-frame, over all shapes
    post_rate: float | None = None
    pre_mean: float | None = None

    def record(self, shape: Shape, *, pre_s: float, step_s: list[float], post_s: float) -> None:
        if step_s:
            mean = sum(step_s) / len(step_s)
            self.step[shape.key] = _ema(self.step.get(shape.key), mean)
            self.step_rate = _ema(self.step_rate, mean / shape.mpf)
        self.pre[shape.key] = _ema(self.pre.get(shape.key), pre_s)
        self.pre_mean = _ema(self.pre_mean, pre_s)
        self.post[shape.key] = _ema(self.post.get(shape.key), post_s)
        self.post_rate = _ema(self.post_rate, post_s / shape.mpf)

    def _step(self, shape: Shape) -> float | None:
        if shape.key in self.step:
            return self.step[shape.key]
        return self.step_rate * shape.mpf if self.step_rate is not None else None

    def _post(self, shape: Shape) -> float | None:
        if shape.key in self.post:
            return self.post[shape.key]
        return self.post_rate * shape.mpf if self.post_rate is not None else None

    def remaining(self, shape: Shape, steps_done: int) -> float | None:
        """Seconds until a job of ``shape`` that has finished ``steps_done`` steps is done."""
        step, post = self._step(shape), self._post(shape)
        if step is None or post is None:
            return None
        pre = 0.0 if steps_done > 0 else self.pre.get(shape.key, self.pre_mean or 0.0)
        return pre + max(shape.steps - steps_done, 0) * step + post

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": dict(self.step), "pre": dict(self.pre), "post": dict(self.post),
            "step_rate": self.step_rate, "post_rate": self.post_rate, "pre_mean": self.pre_mean,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StepStats:
        data = data or {}
        return cls(
            step=dict(data.get("step") or {}), pre=dict(data.get("pre") or {}), post=dict(data.get("post") or {}),
            step_rate=data.get("step_rate"), post_rate=data.get("post_rate"), pre_mean=data.get("pre_mean"),
        )

    @classmethod
    def merge(cls, many: list[StepStats]) -> StepStats:
        """Average of several workers' stats (same GPUs assumed; a mixed fleet gets a blended ETA)."""
        out = cls()
        for attr in ("step", "pre", "post"):
            keys = {k for s in many for k in getattr(s, attr)}
            for k in keys:
                vals = [getattr(s, attr)[k] for s in many if k in getattr(s, attr)]
                getattr(out, attr)[k] = sum(vals) / len(vals)
        for attr in ("step_rate", "post_rate", "pre_mean"):
            vals = [getattr(s, attr) for s in many if getattr(s, attr) is not None]
            setattr(out, attr, sum(vals) / len(vals) if vals else None)
        return out
