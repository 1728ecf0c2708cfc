"""Inline ``--flags`` in chat text, parsed the same way on every front end.

``/t2v a fox in snow --ar 9:16 --seed 42 --steps 2 --res 720p`` -> prompt "a fox in snow" and
``{"aspect": "9:16", "seed": 42, "steps": 2, "resolution": "720p"}``. Spellings and types come from
``generator.params``; values are coerced to the field's type here; range checks happen in ``generator.request.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generator.params import PARAM, PARAMS, RequestError

# flag spelling -> (request field, kind), derived from the declaration (generator.params). kind is the
# field's type for flags taking the next token; a 1-tuple for a switch that sets the field to that constant.
FLAGS: dict[str, tuple[str, Any]] = {}
for _p in PARAMS:
    FLAGS.update({spelling: (_p.name, _p.kind) for spelling in _p.flags})
    FLAGS.update({spelling: (_p.name, (value,)) for spelling, value in _p.switches})

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


def coerce(field_name: str, flag: str, raw: str) -> Any:
    """Turn flag text into the field's type, with a friendly error naming the flag."""
    return PARAM[field_name].coerce_text(raw, f"--{flag}")


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
        repeat = field_name in seen and PARAM[field_name].repeatable
        if field_name in seen and not repeat:
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
        value = coerce(field_name, name, raw_value)
        options[field_name] = f"{options[field_name]},{value}" if repeat else value
    return ParsedText(prompt=" ".join(prompt_words), options=options)
