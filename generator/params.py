"""The request parameters, declared once: name, type, range or choices, default, flag spellings, label, help,
who may set it and whether it is part of the video's identity (the "Same again" flags).

Everything user-facing about a parameter is derived from ``PARAMS``: the chat ``--flags`` (bots.flags),
Discord options, Telegram/shared help, the console form (served as JSON), the CLI options, the config
``[defaults]`` section and the params display. Jobs store the whole request in one JSON column
(storage.models.RequestJSON), so a new parameter needs no migration. ``Limits`` (config ``[limits]``) holds the
server-side bounds some parameters refer to by name. This module is at the bottom layer: it imports nothing
from the rest of the project. Adding a parameter = one ``Param`` here + one field of ``GenerationRequest``
(generator.request; a test keeps the two equal) + the engine code that uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

MODES = ("t2v", "i2v")
RESOLUTIONS = ("480p", "720p")
ASPECTS = ("16:9", "9:16", "1:1", "4:3", "3:4")
SAMPLERS = ("sde", "ode")
ATTENTIONS = ("auto", "sagesla", "sla", "dense")
DECODERS = ("vae", "tiny")
MAX_SEED = 2**63 - 1

Who = Literal["everyone", "moderator", "owner"]
_RANK: dict[str, int] = {"everyone": 0, "user": 0, "moderator": 1, "owner": 2}


class RequestError(ValueError):
    """A request field is invalid. ``str(err)`` is a friendly sentence naming the field and what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Config ``[limits]``: server-side bounds a request must respect (the one limits type).

    ``t2v_models``/``i2v_models`` are not config keys: ``Settings.request_limits`` fills them from
    ``[models]``; the first name of each is the default for that mode.
    """

    max_prompt_chars: int = 800
    min_frames: int = 5
    max_frames: int = 81
    max_steps: int = 4
    resolutions: tuple[str, ...] = RESOLUTIONS
    aspects: tuple[str, ...] = ASPECTS
    min_topk: float = 0.01  # the SLA top-k fraction users may pick
    max_topk: float = 0.5
    max_sigma: float = 1000.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = 8192
    t2v_models: tuple[str, ...] = field(default=(), metadata={"config": False})
    i2v_models: tuple[str, ...] = field(default=(), metadata={"config": False})
    # From ``[loras]`` (Settings.request_limits): the LoRA names on offer, how many per job, the largest |scale|.
    loras: tuple[str, ...] = field(default=(), metadata={"config": False})
    max_loras: int = field(default=3, metadata={"config": False})
    max_lora_scale: float = field(default=2.0, metadata={"config": False})

    def models_for(self, mode: str) -> tuple[str, ...]:
        return self.t2v_models if mode == "t2v" else self.i2v_models


@dataclass(frozen=True)
class Param:
    """One request parameter. Bounds are static (``lo``/``hi``) or named ``Limits`` fields (``*_limit``)."""

    name: str
    kind: type  # str, int, float or bool
    default: Any  # None: decided later (random seed, the mode's model or sigma)
    label: str
    help: str
    flags: tuple[str, ...] = ()  # spellings taking a value; the first is the canonical one
    switches: tuple[tuple[str, Any], ...] = ()  # spellings taking no value, with the value they set
    choices: tuple[str, ...] = ()
    choices_limit: str = ""  # a Limits field narrowing ``choices`` (or, for "models", giving them per mode)
    lo: float | None = None
    hi: float | None = None
    lo_limit: str = ""
    hi_limit: str = ""
    step: int = 1  # form/slider step for whole numbers (frames go in 4s)
    modes: tuple[str, ...] = MODES  # modes that use it (others ignore it)
    who: Who = "everyone"  # the least role that may change it from its default
    identity: bool = False  # shapes what the video is: listed in the params display's "Same again" flags
    configurable: bool = False  # has a config [defaults] key
    option: str = ""  # the typed-option name (Discord option, short form); "" = name
    mode_default: tuple[tuple[str, Any], ...] = ()  # (mode, value) when ``default`` None means "the mode's"
    repeatable: bool = False  # the flag may be given more than once; the values are joined with ","

    @property
    def option_name(self) -> str:
        return self.option or self.name

    @property
    def optional(self) -> bool:
        return self.default is None

    def bounds(self, limits: Limits) -> tuple[float, float] | None:
        if self.kind not in (int, float):
            return None
        lo = getattr(limits, self.lo_limit) if self.lo_limit else self.lo
        hi = getattr(limits, self.hi_limit) if self.hi_limit else self.hi
        assert lo is not None and hi is not None, self.name
        return lo, hi

    def allowed(self, limits: Limits, mode: str = "t2v") -> tuple[str, ...]:
        if self.choices_limit == "models":
            return limits.models_for(mode)
        if self.choices_limit:
            narrowed: tuple[str, ...] = getattr(limits, self.choices_limit)
            return tuple(c for c in self.choices if c in narrowed)
        return self.choices

    def describe(self, limits: Limits) -> str:
        """What may be given, in a few words: "1-4", "480p/720p", "on/off", "NAME"."""
        if self.kind is bool:
            return "on/off"
        if self.kind is int and self.optional:
            return "N"
        b = self.bounds(limits)
        if b is not None:
            if self.step > 1:
                return f"{b[0]:g} to {b[1]:g} in steps of {self.step}"
            return f"{b[0]:g}-{b[1]:g}"
        if self.choices_limit == "loras":
            return "NAME[:SCALE]"
        allowed = self.allowed(limits)
        return "/".join(allowed) if allowed and self.choices_limit != "models" else "NAME"

    def coerce_text(self, raw: str, spelled: str) -> Any:
        """Text (a flag's or form field's value) -> the parameter's type; the error names ``spelled``."""
        text = raw.strip()
        try:
            if self.kind is int:
                return int(text.replace("_", ""), 10)
            if self.kind is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
                return value
        except ValueError:
            noun = "a whole number" if self.kind is int else "a number"
            raise RequestError(self.name, f"{spelled} needs {noun} (got '{raw}').") from None
        if self.kind is bool:
            low = text.lower()
            if low in ("1", "true", "on", "yes"):
                return True
            if low in ("0", "false", "off", "no"):
                return False
            raise RequestError(self.name, f"{self.label} must be on or off (got '{raw}').")
        return text

    def check(self, value: Any, limits: Limits, mode: str = "t2v") -> Any:
        """The normalised value, or ``RequestError`` naming the parameter and what is allowed."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RequestError(self.name, f"{self.label} must be on or off.")
            return value
        if self.choices_limit == "loras":
            return format_loras(check_loras(value, limits))
        if self.kind is str:
            allowed = self.allowed(limits, mode)
            v = str(value).strip().lower()
            if v not in allowed:
                raise RequestError(self.name, f"{self.label} must be one of {', '.join(allowed)} (got '{value}').")
            return v
        lo, hi = self.bounds(limits) or (0, 0)
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError(self.name, f"{self.label} must be a whole number from {lo:g} to {hi:g} (got '{value}').")
            if not lo <= value <= hi:
                raise RequestError(self.name, f"{self.label} must be from {lo:g} to {hi:g} (got {value}).")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(self.name, f"{self.label} must be a number from {lo:g} to {hi:g} (got '{value}').")
        if not lo <= float(value) <= hi:
            raise RequestError(self.name, f"{self.label} must be from {lo:g} to {hi:g} (got {value:g}).")
        return float(value)

    def effective(self, value: Any, mode: str) -> Any:
        """The value a job runs with: ``value``, or the mode's default where None stands for it."""
        return dict(self.mode_default).get(mode, value) if value is None else value

    def summary(self, value: Any) -> str:
        """The value in a one-line summary: "81 frames", "4 steps", "480p"."""
        return f"{self.shown(value)} {self.label.lower()}" if self.kind is int else self.shown(value)

    def may_set(self, role: str) -> bool:
        return _RANK.get(role, 0) >= _RANK[self.who]

    def shown(self, value: Any) -> str:
        """The value as the params display and help show it."""
        if self.kind is bool:
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def as_json(self, limits: Limits) -> dict[str, Any]:
        """The form description the console's script renders."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind.__name__, "label": self.label, "help": self.help,
            "default": self.default, "modes": list(self.modes), "who": self.who,
        }
        b = self.bounds(limits)
        if b is not None:
            out.update(min=b[0], max=b[1], step=self.step if self.kind is int else "any")
        if self.choices_limit == "loras":  # free text, with the names on offer for the form's hint
            out.update(free_text=True, available=list(limits.loras))
        elif self.kind is str:
            out["choices"] = (
                {m: list(limits.models_for(m)) for m in MODES} if self.choices_limit == "models"
                else list(self.allowed(limits))
            )
        return out


PARAMS: tuple[Param, ...] = (
    Param("model", str, None, "Model", "configured model name (default: the first one for the mode)",
          flags=("model",), choices_limit="models", identity=True),
    Param("resolution", str, "480p", "Resolution", "output resolution", flags=("res", "resolution"),
          choices=RESOLUTIONS, choices_limit="resolutions", identity=True, configurable=True),
    Param("aspect", str, "16:9", "Aspect ratio", "aspect ratio", flags=("ar", "aspect"),
          choices=ASPECTS, choices_limit="aspects", identity=True, configurable=True),
    Param("frames", int, 81, "Frames", "number of frames, 1 more than a multiple of 4 (81 = 5 s at 16 fps)",
          flags=("frames",), lo_limit="min_frames", hi_limit="max_frames", step=4, identity=True, configurable=True),
    Param("steps", int, 4, "Steps", "sampling steps (more = better, slower)", flags=("steps",),
          lo=1, hi_limit="max_steps", identity=True, configurable=True),
    Param("seed", int, None, "Seed", "seed (0 or empty = random; the seed used is shown)", flags=("seed",),
          lo=0, hi=MAX_SEED, identity=True),
    Param("sla_topk", float, 0.1, "SLA top-k", "fraction of key blocks each query block attends to",
          flags=("topk", "sla-topk"), lo_limit="min_topk", hi_limit="max_topk", configurable=True, option="topk"),
    Param("sigma_max", float, None, "sigma_max", "initial sigma (default 80 T2V, 200 I2V)",
          flags=("sigma", "sigma-max"), lo=1.0, hi_limit="max_sigma", mode_default=(("t2v", 80.0), ("i2v", 200.0))),
    Param("sampler", str, "sde", "Sampler", "sde, or ode (sharper I2V)", flags=("sampler",),
          switches=(("ode", "ode"), ("sde", "sde")), choices=SAMPLERS, configurable=True),
    Param("adaptive_resolution", bool, False, "Adaptive resolution", "I2V: keep the image's own aspect ratio",
          switches=(("adaptive", True), ("no-adaptive", False)), modes=("i2v",), option="adaptive"),
    Param("boundary", float, 0.9, "Boundary", "I2V: switch to the low-noise expert below this t",
          flags=("boundary",), lo=0.0, hi=1.0, modes=("i2v",), configurable=True),
    Param("attention", str, "auto", "Attention", "attention kernel", flags=("attention", "attn"),
          choices=ATTENTIONS, configurable=True),
    Param("decoder", str, "vae", "Decoder", "tiny = fast draft decode", flags=("decoder",),
          switches=(("draft", "tiny"),), choices=DECODERS),
    Param("loras", str, "", "LoRA styles",
          "style LoRAs, NAME or NAME:SCALE, comma-separated or repeated (see /loras)",
          flags=("lora", "loras"), choices_limit="loras", repeatable=True, option="lora"),
    Param("expand", bool, False, "Prompt expansion",
          "rewrite a short or non-English prompt into a detailed English one (when the server offers it)",
          switches=(("expand", True), ("no-expand", False)), configurable=True),
)

PARAM: dict[str, Param] = {p.name: p for p in PARAMS}


def defaults_of(params: tuple[Param, ...] = PARAMS) -> dict[str, Any]:
    return {p.name: p.default for p in params}


def by_option(name: str) -> tuple[Param, Any] | None:
    """A typed option's name (field name, option name or flag spelling, ``-`` or ``_``) -> the parameter,
    plus the value a switch spelling stands for (``dataclasses.MISSING`` for value options)."""
    key = name.strip().lower()
    for p in PARAMS:
        spellings = {p.name, p.option_name, *p.flags, *(f.replace("-", "_") for f in p.flags)}
        if key in spellings:
            return p, dataclasses.MISSING
        for spelling, value in p.switches:
            if key in (spelling, spelling.replace("-", "_")):
                return p, value
    return None


def parse_loras(value: str) -> list[tuple[str, float]]:
    """``"ink:0.8, neon"`` -> [("ink", 0.8), ("neon", 1.0)] (syntax only; ``check_loras`` checks names)."""
    out: list[tuple[str, float]] = []
    for part in str(value).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, raw = part.partition(":")
        name = name.strip().lower()
        scale = 1.0
        if raw.strip():
            try:
                scale = float(raw)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise RequestError("loras", f"LoRA scale must be a number, as in {name}:0.8 (got '{raw.strip()}').")
        out.append((name, scale))
    return out


def check_loras(value: Any, limits: Limits) -> list[tuple[str, float]]:
    """Parsed, checked LoRA choices: known names (close matches offered), count and scale within limits."""
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise RequestError("loras", "LoRA styles must be given as text, e.g. ink:0.8,neon.")
    chosen = parse_loras(value)
    if len(chosen) > limits.max_loras:
        raise RequestError("loras", f"At most {limits.max_loras} LoRA styles per video (got {len(chosen)}).")
    names = [n for n, _ in chosen]
    if len(set(names)) != len(names):
        raise RequestError("loras", "Each LoRA style may be given once.")
    for name, scale in chosen:
        if name not in limits.loras:
            if not limits.loras:
                raise RequestError("loras", f"Unknown LoRA style '{name}': this server offers none.")
            close = difflib.get_close_matches(name, limits.loras, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else f" Available: {', '.join(limits.loras)}."
            raise RequestError("loras", f"Unknown LoRA style '{name}'.{hint} (/loras lists them)")
        if abs(scale) > limits.max_lora_scale:
            raise RequestError("loras", f"LoRA scale must be from -{limits.max_lora_scale:g} to "
                                        f"{limits.max_lora_scale:g} (got {name}:{scale:g}).")
    return chosen


def format_loras(chosen: list[tuple[str, float]]) -> str:
    """The stored canonical form: ``name:scale`` joined with ``,``."""
    return ",".join(f"{n}:{s:g}" for n, s in chosen)
