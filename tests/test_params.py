"""The request parameters are declared once (generator.params); every front end derives from it."""

from __future__ import annotations

import dataclasses

import pytest

from bots.commands import build_request
from bots.flags import FLAGS, parse_flags
from bots.texts import help_text
from bots.web.api_jobs import options_payload
from bots.web.forms import coerce_options
from generator.params import PARAMS, RequestError
from generator.request import GenerationRequest, validate
from turbobot.cli import _request_options, build_parser
from turbobot.config import ConfigError, Settings, settings_from_dict


def test_request_fields_mirror_the_declaration() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
    assert {p.name: p.default for p in PARAMS} == {k: v for k, v in fields.items() if k not in ("mode", "prompt", "image", "original_prompt", "extends")}


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_every_parameter_reaches_every_front_end(param: object) -> None:
    from generator.params import Param

    assert isinstance(param, Param)
    s = Settings()
    assert param.name in {name for name, _ in FLAGS.values()}
    assert any(f"--{f}" in help_text() for f in (*param.flags, *(sw for sw, _ in param.switches)))
    assert param.name in {f["name"] for f in options_payload(s)["params"]}
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}  # type: ignore[union-attr]
    assert param.name in dests
    if param.configurable:
        assert hasattr(s.defaults, param.name)


def test_decoder_flows_from_every_front_end_to_the_request() -> None:
    s = Settings()
    assert parse_flags("a fox --draft").options == {"decoder": "tiny"}
    assert build_request(s, "t2v", "a fox --decoder tiny").decoder == "tiny"
    assert build_request(s, "t2v", "a fox", options={"decoder": "tiny"}).decoder == "tiny"
    assert coerce_options({"decoder": "tiny"}) == {"decoder": "tiny"}
    args = build_parser().parse_args(["generate", "a fox", "--draft"])
    assert _request_options(args) == {"decoder": "tiny"}
    req = validate(build_request(s, "t2v", "a fox --draft"), s.request_limits)
    assert GenerationRequest.from_dict(req.to_dict()).decoder == "tiny"
    stored_before = {k: v for k, v in req.to_dict().items() if k != "decoder"}  # a row written before decoder
    assert GenerationRequest.from_dict(stored_before).decoder == "vae"
    with pytest.raises(RequestError) as err:
        validate(build_request(s, "t2v", "a fox --decoder huge"), s.request_limits)
    assert "Decoder must be one of vae, tiny" in err.value.message


def test_one_limits_type() -> None:
    from generator import params, request
    from turbobot import config

    assert request.Limits is params.Limits and type(Settings().limits) is params.Limits
    assert not hasattr(config, "LimitsSettings")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"defaults": {"steps": 9}}, "defaults.steps = 9 is refused: Steps must be from 1 to 4"),
        ({"defaults": {"attention": "flash"}}, "defaults.attention = 'flash' is not allowed"),
        ({"defaults": {"aspect": "1:1"}, "limits": {"aspects": ["16:9"]}}, "defaults.aspect = '1:1' is refused"),
        ({"defaults": {"decoder": "tiny"}}, "Unknown setting defaults.decoder"),
    ],
)
def test_config_defaults_outside_limits_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data)
    assert needle in str(err.value)


def test_a_moderator_only_parameter_is_refused_to_users() -> None:
    s = Settings()
    guarded = dataclasses.replace(PARAMS[0], name="decoder", who="moderator", choices=("vae", "tiny"), choices_limit="")
    assert not guarded.may_set("user") and guarded.may_set("moderator") and guarded.may_set("owner")
    assert validate(GenerationRequest(mode="t2v", prompt="x", decoder="tiny"), s.request_limits, "user").decoder == "tiny"
