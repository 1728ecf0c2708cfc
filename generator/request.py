"""The generation request: one validated description of a video job, shared by every front end.

Front ends build a ``GenerationRequest`` from chat flags, slash-command options or web forms; the
scheduler stores it; the engine renders it. Validation lives here so that crafted payloads (chat clients
do not enforce their own ranges) are checked in exactly one place.
"""

from __future__ import annotations

import dataclasses
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from generator.params import (
    ASPECTS,
    ATTENTIONS,
    MAX_SEED,
    MODES,
    PARAM,
    PARAMS,
    RESOLUTIONS,
    SAMPLERS,
    Limits,
    RequestError,
)

__all__ = [
    "ASPECTS", "ATTENTIONS", "MAX_SEED", "MODES", "RESOLUTIONS", "SAMPLERS", "SIZES", "USER_FIELDS",
    "GenerationRequest", "Limits", "RequestError", "clean_prompt", "new_seed", "validate",
]

# (resolution, aspect) -> (width, height), docs/engine.md section 6.
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

SIGMA_MAX_DEFAULT: dict[str, float] = dict(PARAM["sigma_max"].mode_default)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything needed to render one video, apart from the input image bytes (referenced by ``image``).

    The parameter fields mirror ``generator.params.PARAMS`` (names and defaults; a test keeps them equal):
    typed here so a wrong type across a module boundary is caught. ``seed`` None means "pick one at
    submission"; after submission the stored request always carries the seed actually used. ``model`` None
    means the configured default for the mode. ``sigma_max`` None means the mode's default.
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
    decoder: str = "vae"
    loras: str = ""  # canonical "name:scale,..." (generator.params.format_loras); "" = none
    expand: bool = False
    # Set by the scheduler when prompt expansion rewrote ``prompt``: what the user typed (shown with the video).
    original_prompt: str | None = None
    # Set by the scheduler on an Extend: the job whose video this one continues (the delivered mp4 is that
    # video followed by this job's frames). Chains: extending an extension continues the joined video.
    extends: int | None = None

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

    def effective(self, name: str) -> Any:
        """A parameter's value as the job runs with it (a mode-dependent default filled in)."""
        return PARAM[name].effective(getattr(self, name), self.mode)

    def params(self) -> dict[str, Any]:
        """The declared parameters and their values, in declaration order."""
        return {p.name: getattr(self, p.name) for p in PARAMS}

    # --- (de)serialisation: the scheduler stores requests as JSON ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Rebuild a stored request; keys it lacks (written before a parameter existed) take the default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RequestError(unknown[0], f"Unknown setting '{unknown[0]}'.")
        return cls(**data)

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> GenerationRequest:
        """A request as the jobs table holds it. Keys this version does not know (a row written by a newer
        version, read after a downgrade) are dropped so the job stays readable; missing ones take the default."""
        return cls(**{k: v for k, v in data.items() if k in _FIELD_NAMES})


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GenerationRequest))

# Fields a user may override on a remix / through flags, with their types.
USER_FIELDS: dict[str, type] = {"prompt": str, **{p.name: p.kind for p in PARAMS}}


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


def validate(req: GenerationRequest, limits: Limits, role: str = "everyone") -> GenerationRequest:
    """Return a normalised copy of ``req`` or raise ``RequestError`` naming the bad field.

    Every declared parameter is checked by its declaration (type, range or choices from ``limits``, who may
    change it: ``role``); the rules that tie fields together (prompt, image, frame packing, seed 0) are here.
    """
    mode = str(req.mode).strip().lower()
    if mode not in MODES:
        raise RequestError("mode", f"Mode must be one of {', '.join(MODES)} (got '{req.mode}').")
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

    values: dict[str, Any] = {}
    for p in PARAMS:
        value = getattr(req, p.name)
        if not p.may_set(role) and value != p.default:
            raise RequestError(p.name, f"Only {p.who}s may change {p.label}.")
        if p.choices_limit == "models":
            models = limits.models_for(mode)
            if value is None:
                if not models:
                    raise RequestError(p.name, f"No {mode} model is configured on this server.")
                value = models[0]
            try:
                values[p.name] = p.check(value, limits, mode)
            except RequestError:
                raise RequestError(
                    p.name, f"{p.label} must be one of {', '.join(models)} for {mode} (got '{value}')."
                ) from None
            continue
        values[p.name] = p.check(value, limits, mode)

    frames = values["frames"]
    if frames % 4 != 1:
        lo, hi = frames - (frames - 1) % 4, frames - (frames - 1) % 4 + 4
        hint = " or ".join(str(f) for f in (lo, hi) if limits.min_frames <= f <= limits.max_frames)
        raise RequestError("frames", f"Frames must be 1 more than a multiple of 4 (try {hint}); got {frames}.")
    if values["seed"] == 0:
        values["seed"] = None  # 0 means "random", as in the upstream tool
    return dataclasses.replace(req, mode=mode, prompt=prompt, **values)


def new_seed() -> int:
    """A random seed in 1..2**31-1 (small enough to type back, never 0 which means random)."""
    return secrets.randbelow(2**31 - 1) + 1
