"""The generation request: one validated description of a video job, shared by every front end.

Front ends build a ``GenerationRequest`` from chat flags, slash-command options or web forms; the
scheduler stores it; the engine renders it. Validation lives here so that crafted payloads (chat clients
do not enforce their own ranges) are checked in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Any

MODES = ("t2v", "i2v")
RESOLUTIONS = ("480p", "720p")
ASPECTS = ("16:9", "9:16", "1:1", "4:3", "3:4")
SAMPLERS = ("sde", "ode")
ATTENTIONS = ("auto", "sagesla", "sla", "dense")

# (resolution, aspect) -> (width, height), engine.md section 6.
SIZES: dict[tuple[str, str], tuple[int, int]] = {
    ("480p", "1:1"): (640, 640),
    ("480p", "4:3"): (640, 480),
    ("480p", "3:4"): (480, 640),
    ("480p", "16:9"): (832, 480),
    ("480p", "9:16"): (480, 832),
    ("720p", "1:1"): (960, 960),
    ("720p", "4:3"): (960, 720),
    ("720p", "3:4"): (720, 960),
    ("720p", "16:9"): (1280, 720),
    ("720p", "9:16"): (720, 1280),
}

MAX_SEED = 2**63 - 1
SIGMA_MAX_DEFAULT = {"t2v": 80.0, "i2v": 200.0}


class RequestError(ValueError):
    """A request field is invalid. ``str(err)`` is a friendly sentence naming the field and what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Server-side bounds a request must respect.

    No defaults on purpose: the only source is the configuration (``Settings.request_limits``, from
    config.toml ``[limits]`` and ``[models]``), so the bounds a request is checked against are the ones the
    configuration's defaults were checked against.
    """

    max_prompt_chars: int
    min_frames: int
    max_frames: int
    max_steps: int
    resolutions: tuple[str, ...]
    aspects: tuple[str, ...]
    # Model names a user may pick, per mode; the first one is the default for that mode.
    t2v_models: tuple[str, ...]
    i2v_models: tuple[str, ...]
    min_topk: float
    max_topk: float
    max_sigma: float

    def models_for(self, mode: str) -> tuple[str, ...]:
        return self.t2v_models if mode == "t2v" else self.i2v_models


@dataclass(frozen=True)
class GenerationRequest:
    """Everything needed to render one video, apart from the input image bytes (referenced by ``image``).

    ``seed`` None means "pick one at submission"; after submission the stored request always carries the
    seed actually used. ``model`` None means the configured default for the mode. ``sigma_max`` None means
    the mode's default (80 for T2V, 200 for I2V).
    """

    mode: str
    prompt: str
    image: str | None = None  # server-side reference to a stored input (its sha256), never a user path
    model: str | None = None
    resolution: str = "480p"
    aspect: str = "16:9"
    frames: int = 81
    steps: int = 4
    seed: int | None = None
    sla_topk: float = 0.1
    sigma_max: float | None = None
    sampler: str = "sde"
    adaptive_resolution: bool = False
    boundary: float = 0.9
    attention: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # --- derived values -------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(width, height) before adaptive resolution (which needs the image and is done by the engine)."""
        return SIZES[(self.resolution, self.aspect)]

    @property
    def effective_sigma_max(self) -> float:
        return self.sigma_max if self.sigma_max is not None else SIGMA_MAX_DEFAULT[self.mode]

    @property
    def duration_s(self) -> float:
        return self.frames / 16.0

    def with_seed(self, seed: int) -> GenerationRequest:
        return dataclasses.replace(self, seed=seed)

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    # --- (de)serialisation: the scheduler stores requests as JSON ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RequestError(unknown[0], f"Unknown setting '{unknown[0]}'.")
        return cls(**data)


# Fields a user may override on a remix / through flags, with their types (used by the flag parser and
# the web console to coerce text input).
USER_FIELDS: dict[str, type] = {
    "prompt": str,
    "model": str,
    "resolution": str,
    "aspect": str,
    "frames": int,
    "steps": int,
    "seed": int,
    "sla_topk": float,
    "sigma_max": float,
    "sampler": str,
    "adaptive_resolution": bool,
    "boundary": float,
    "attention": str,
}


def clean_prompt(text: str) -> str:
    """Strip control characters and collapse whitespace (newlines become spaces)."""
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\n\r\t":
            kept.append(" ")
        elif cat.startswith("C"):
            continue
        else:
            kept.append(ch)
    return " ".join("".join(kept).split())


def _choice(name: str, value: Any, allowed: tuple[str, ...], label: str) -> str:
    v = str(value).strip().lower()
    if v not in allowed:
        raise RequestError(name, f"{label} must be one of {', '.join(allowed)} (got '{value}').")
    return v


def _int_range(name: str, value: Any, lo: int, hi: int, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{label} must be a whole number from {lo} to {hi} (got '{value}').")
    if not lo <= value <= hi:
        raise RequestError(name, f"{label} must be from {lo} to {hi} (got {value}).")
    return value


def _float_range(name: str, value: Any, lo: float, hi: float, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, f"{label} must be a number from {lo:g} to {hi:g} (got '{value}').")
    if not lo <= float(value) <= hi:
        raise RequestError(name, f"{label} must be from {lo:g} to {hi:g} (got {value:g}).")
    return float(value)


def validate(req: GenerationRequest, limits: Limits) -> GenerationRequest:
    """Return a normalised copy of ``req`` or raise ``RequestError`` naming the bad field."""
    mode = _choice("mode", req.mode, MODES, "Mode")
    if not isinstance(req.prompt, str):
        raise RequestError("prompt", "The prompt must be text.")
    prompt = clean_prompt(req.prompt)
    if not prompt:
        raise RequestError("prompt", "Please describe the video you want (the prompt is empty).")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            "prompt",
            f"The prompt is too long: {len(prompt)} characters, the limit is {limits.max_prompt_chars}.",
        )
    if mode == "i2v" and not req.image:
        raise RequestError("image", "Image-to-video needs an image: attach one or reply to one.")
    if mode == "t2v" and req.image:
        raise RequestError("image", "Text-to-video takes no image; use i2v to animate an image.")

    models = limits.models_for(mode)
    model = req.model if req.model is not None else (models[0] if models else None)
    if model is None:
        raise RequestError("model", f"No {mode} model is configured on this server.")
    model = str(model).strip().lower()
    if model not in models:
        raise RequestError("model", f"Model must be one of {', '.join(models)} for {mode} (got '{req.model}').")

    resolution = _choice("resolution", req.resolution, limits.resolutions, "Resolution")
    aspect = _choice("aspect", req.aspect, limits.aspects, "Aspect ratio")
    frames = _int_range("frames", req.frames, limits.min_frames, limits.max_frames, "Frames")
    if frames % 4 != 1:
        lo, hi = frames - (frames - 1) % 4, frames - (frames - 1) % 4 + 4
        hint = " or ".join(str(f) for f in (lo, hi) if limits.min_frames <= f <= limits.max_frames)
        raise RequestError("frames", f"Frames must be 1 more than a multiple of 4 (try {hint}); got {frames}.")
    steps = _int_range("steps", req.steps, 1, limits.max_steps, "Steps")
    seed = req.seed
    if seed is not None:
        seed = _int_range("seed", seed, 0, MAX_SEED, "Seed")
        if seed == 0:
            seed = None  # 0 means "random", as in the upstream tool
    topk = _float_range("sla_topk", req.sla_topk, limits.min_topk, limits.max_topk, "SLA top-k")
    sigma = req.sigma_max
    if sigma is not None:
        sigma = _float_range("sigma_max", sigma, 1.0, limits.max_sigma, "sigma_max")
    sampler = _choice("sampler", req.sampler, SAMPLERS, "Sampler")
    if not isinstance(req.adaptive_resolution, bool):
        raise RequestError("adaptive_resolution", "Adaptive resolution must be on or off.")
    boundary = _float_range("boundary", req.boundary, 0.0, 1.0, "Boundary")
    attention = _choice("attention", req.attention, ATTENTIONS, "Attention")
    return dataclasses.replace(
        req,
        mode=mode,
        prompt=prompt,
        model=model,
        resolution=resolution,
        aspect=aspect,
        frames=frames,
        steps=steps,
        seed=seed,
        sla_topk=topk,
        sigma_max=sigma,
        sampler=sampler,
        boundary=boundary,
        attention=attention,
    )


def new_seed() -> int:
    """A random seed in 1..2**31-1 (small enough to type back, never 0 which means random)."""
    return secrets.randbelow(2**31 - 1) + 1
