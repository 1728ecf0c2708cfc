"""Request validation: every bad field gets a message naming it and what is allowed."""

from __future__ import annotations

import pytest

from bots.commands import build_request, parse_remix
from generator.request import GenerationRequest, RequestError, validate
from turbobot.config import Settings, settings_from_dict

LIM = Settings().request_limits


def req(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {"mode": "t2v", "prompt": "a red fox running through snow"}
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


def test_defaults_validate_and_fill_model() -> None:
    r = validate(req(), LIM)
    assert r.model == "tiny-t2v"
    assert r.size == (832, 480)
    assert r.effective_sigma_max == 80.0
    assert validate(req(mode="i2v", image="ab" * 32), LIM).effective_sigma_max == 200.0


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        ({"prompt": "   "}, "prompt", "empty"),
        ({"prompt": "x" * 801}, "prompt", "801 characters, the limit is 800"),
        ({"resolution": "1080p"}, "resolution", "480p, 720p"),
        ({"aspect": "2:1"}, "aspect", "16:9"),
        ({"frames": 80}, "frames", "try 77 or 81"),
        ({"frames": 85}, "frames", "from 5 to 81"),
        ({"frames": "81"}, "frames", "whole number"),
        ({"steps": 5}, "steps", "from 1 to 4"),
        ({"steps": 0}, "steps", "from 1 to 4"),
        ({"seed": -1}, "seed", "from 0"),
        ({"sla_topk": 0.9}, "sla_topk", "SLA top-k"),
        ({"sampler": "euler"}, "sampler", "sde, ode"),
        ({"boundary": 1.5}, "boundary", "from 0 to 1"),
        ({"model": "wan-99b"}, "model", "tiny-t2v"),
        ({"attention": "flash"}, "attention", "auto, sagesla, sla, dense"),
        ({"mode": "t2i"}, "mode", "t2v, i2v"),
        ({"image": "abc"}, "image", "takes no image"),
        ({"mode": "i2v"}, "image", "needs an image"),
    ],
)
def test_bad_fields(changes: dict[str, object], field: str, needle: str) -> None:
    with pytest.raises(RequestError) as err:
        validate(req(**changes), LIM)
    assert err.value.field == field
    assert needle in str(err.value)


def test_prompt_control_chars_stripped_and_seed_zero_is_random() -> None:
    r = validate(req(prompt="a\x00 fox\n\tin\u200b snow\x1b", seed=0), LIM)
    assert r.prompt == "a fox in snow"
    assert r.seed is None


def test_roundtrip_dict() -> None:
    r = validate(req(seed=5, steps=2), LIM)
    assert GenerationRequest.from_dict(r.to_dict()) == r
    with pytest.raises(RequestError):
        GenerationRequest.from_dict({**r.to_dict(), "bogus": 1})


def test_build_request_merges_flags_options_and_defaults() -> None:
    settings = settings_from_dict({"defaults": {"steps": 2, "aspect": "1:1"}})
    r = build_request(settings, "t2v", "a fox --seed 7", options={"resolution": "720p", "frames": None})
    assert (r.prompt, r.seed, r.steps, r.aspect, r.resolution) == ("a fox", 7, 2, "1:1", "720p")
    with pytest.raises(RequestError) as err:
        build_request(settings, "t2v", "a fox --seed 7", options={"seed": 8})
    assert "set twice" in err.value.message
    i2v = build_request(settings, "i2v", "", image="f" * 64)
    assert i2v.prompt == settings.defaults.i2v_prompt


def test_parse_remix() -> None:
    assert parse_remix("a wolf instead --steps 2") == {"prompt": "a wolf instead", "steps": 2}
    assert parse_remix("", {"ar": "9:16"}) == {"aspect": "9:16"}
