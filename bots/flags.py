"""Inline ``--flags`` in chat text, parsed the same way on every front end.

``/t2v a fox in snow --ar 9:16 --seed 42 --steps 2 --res 720p`` -> prompt "a fox in snow" and
``{"aspect": "9:16", "seed": 42, "steps": 2, "resolution": "720p"}``. Values are coerced to the request
field's type here; range checks happen in ``generator.request.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generator.request import RequestError

# flag spelling -> (request field, kind). kind "value" takes the next token; a tuple is a switch that
# sets the field to that constant.
FLAGS: dict[str, tuple[str, Any]] = {
    "ar": ("aspect", str),
    "aspect": ("aspect", str),
    "res": ("resolution", str),
    "resolution": ("resolution", str),
    "steps": ("steps", int),
    "seed": ("seed", int),
    "frames": ("frames", int),
    "model": ("model", str),
    "topk": ("sla_topk", float),
    "sla-topk": ("sla_topk", float),
    "sigma": ("sigma_max", float),
    "sigma-max": ("sigma_max", float),
    "sampler": ("sampler", str),
    "ode": ("sampler", ("ode",)),
    "sde": ("sampler", ("sde",)),
    "adaptive": ("adaptive_resolution", (True,)),
    "no-adaptive": ("adaptive_resolution", (False,)),
    "boundary": ("boundary", float),
    "attention": ("attention", str),
    "attn": ("attention", str),
}

# Phones turn "--" into an em or en dash; accept those as the flag prefix too.
_PREFIXES = ("--", "\u2014", "\u2013")


@dataclass(frozen=True)
class ParsedText:
    prompt: str
    options: dict[str, Any]


def _flag_name(token: str) -> str | None:
    for p in _PREFIXES:
        if token.startswith(p) and len(token) > len(p) and not token[len(p)].isspace():
            return token[len(p):]
    return None


def coerce(field_name: str, flag: str, kind: type, raw: str) -> Any:
    """Turn flag text into the field's type, with a friendly error naming the flag."""
    try:
        if kind is int:
            return int(raw.replace("_", ""), 10)
        if kind is float:
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise RequestError(field_name, f"--{flag} needs {noun} (got '{raw}').") from None
    return raw


def known_flags() -> str:
    return ", ".join(f"--{f}" for f in FLAGS)


def parse_flags(text: str) -> ParsedText:
    """Split chat text into the prompt and typed options; raise ``RequestError`` on a bad flag."""
    tokens = text.split()
    prompt_words: list[str] = []
    options: dict[str, Any] = {}
    seen: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = _flag_name(tok)
        if name is None:
            prompt_words.append(tok)
            i += 1
            continue
        raw_value: str | None = None
        if "=" in name:
            name, raw_value = name.split("=", 1)
        key = name.lower()
        if key not in FLAGS:
            raise RequestError("flags", f"Unknown option --{name}. Known options: {known_flags()}.")
        field_name, kind = FLAGS[key]
        if field_name in seen:
            also = "" if seen[field_name].lower() == key else f" (also as --{seen[field_name]})"
            raise RequestError(field_name, f"--{name} is given twice{also}; keep one.")
        seen[field_name] = name
        if isinstance(kind, tuple):
            if raw_value is not None:
                raise RequestError(field_name, f"--{name} is a switch and takes no value.")
            options[field_name] = kind[0]
            i += 1
            continue
        if raw_value is None:
            if i + 1 >= len(tokens) or _flag_name(tokens[i + 1]) is not None:
                raise RequestError(field_name, f"--{name} needs a value.")
            raw_value = tokens[i + 1]
            i += 2
        else:
            i += 1
        if raw_value == "":
            raise RequestError(field_name, f"--{name} needs a value.")
        options[field_name] = coerce(field_name, name, kind, raw_value)
    return ParsedText(prompt=" ".join(prompt_words), options=options)
