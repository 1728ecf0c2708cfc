"""Inline flag parser: examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots.flags import FLAGS, parse_flags
from generator.request import RequestError


def test_example_from_the_docs() -> None:
    p = parse_flags("a fox in snow --ar 9:16 --seed 42 --steps 2 --res 720p")
    assert p.prompt == "a fox in snow"
    assert p.options == {"aspect": "9:16", "seed": 42, "steps": 2, "resolution": "720p"}


def test_flags_anywhere_equals_form_switches_and_phone_dashes() -> None:
    p = parse_flags("—ar 1:1 a cat --ode\n jumping --topk=0.15 –frames 33")
    assert p.prompt == "a cat jumping"
    assert p.options == {"aspect": "1:1", "sampler": "ode", "sla_topk": 0.15, "frames": 33}


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        ("a fox --colour red", "flags", "Unknown option --colour"),
        ("a fox --seed 1 --seed 2", "seed", "twice"),
        ("a fox --ar 1:1 --aspect 4:3", "aspect", "twice"),
        ("a fox --steps", "steps", "needs a value"),
        ("a fox --steps --seed 3", "steps", "needs a value"),
        ("a fox --steps two", "steps", "whole number"),
        ("a fox --topk lots", "sla_topk", "needs a number"),
        ("a fox --topk nan", "sla_topk", "needs a number"),
        ("a fox --ode=yes", "sampler", "switch"),
    ],
)
def test_bad_flags_are_named(text: str, field: str, needle: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_flags(text)
    assert err.value.field == field
    assert needle in err.value.message


words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=12).filter(
    lambda w: not w.startswith(("--", "—", "–"))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(words, max_size=12))
def test_text_without_flags_is_all_prompt(ws: list[str]) -> None:
    p = parse_flags(" ".join(ws))
    assert p.options == {}
    assert p.prompt == " ".join(ws)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(words, max_size=8),
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=1, max_value=4),
    st.sampled_from(["16:9", "9:16", "1:1"]),
    st.permutations(["seed", "steps", "ar"]),
)
def test_flags_roundtrip_in_any_order(ws: list[str], seed: int, steps: int, ar: str, order: list[str]) -> None:
    values = {"seed": str(seed), "steps": str(steps), "ar": ar}
    text = " ".join(ws) + " " + " ".join(f"--{k} {values[k]}" for k in order)
    p = parse_flags(text)
    assert p.prompt == " ".join(ws)
    assert p.options == {"seed": seed, "steps": steps, "aspect": ar}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parser_never_crashes_unexpectedly(text: str) -> None:
    try:
        p = parse_flags(text)
    except RequestError as exc:
        assert exc.message
    else:
        assert set(p.options) <= {f for f, _ in FLAGS.values()}
