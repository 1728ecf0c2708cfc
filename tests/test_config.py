"""config.toml: the shipped file equals the built-in defaults; bad values are named clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbobot.config import ConfigError, Settings, load_settings, read_secret, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_matches_defaults() -> None:
    shipped = load_settings(ROOT / "config.toml")
    builtin = Settings()
    for section in ("app", "database", "engine", "defaults", "limits", "quotas", "scheduler", "admin", "discord", "telegram", "web", "store"):
        assert getattr(shipped, section) == getattr(builtin, section), section
    assert shipped.models == {}
    assert shipped.model_names("t2v") == ("tiny-t2v",)


def test_documented_model_example_parses_with_default_choices() -> None:
    """The commented [models.wan13b] example in config.toml, uncommented, is valid and documents the defaults
    of the settings that have one (it used to be [models.wan-1.3b], which TOML reads as models -> wan-1 -> 3b)."""
    import tomllib

    from turbobot.config import ModelSettings

    lines = (ROOT / "config.toml").read_text().splitlines()
    start = lines.index("# [models.wan13b]")
    block = []
    for line in lines[start:]:
        if line.strip() == "#":
            break
        block.append(line[2:])
    data = tomllib.loads("\n".join(block))
    settings = settings_from_dict(data)
    model = settings.models["wan13b"]
    defaults = ModelSettings()
    for key in ("quantized", "precision", "decoder"):
        assert getattr(model, key) == getattr(defaults, key), key
    assert model.tiny_decoder.endswith("taew2_1.pth")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"bogus": {}}, "Unknown section [bogus]"),
        ({"engine": {"attention": "flash"}}, "engine.attention = 'flash' is not allowed; use one of: auto, sagesla, sla, dense"),
        ({"engine": {"devcie": "cpu"}}, "Unknown setting engine.devcie"),
        ({"quotas": {"max_queued_per_user": "3"}}, "quotas.max_queued_per_user must be an integer"),
        ({"limits": {"resolutions": ["480p", "1080p"]}}, "limits.resolutions = '1080p' is not allowed"),
        ({"defaults": {"frames": 80}}, "defaults.frames = 80 is refused: Frames must be 1 more than a multiple of 4"),
        ({"defaults": {"resolution": "720p"}, "limits": {"resolutions": ["480p"]}}, "defaults.resolution"),
        ({"models": {"big": {"kind": "wan2.1-t2v-14b"}}}, "models.big.transformer must be set"),
        ({"models": {"big": {"kind": "wan3"}}}, "models.big.kind = 'wan3' is not allowed"),
        ({"engine": {"t2v_model": "nope"}}, "engine.t2v_model = 'nope' is not a configured t2v model"),
        ({"discord": {"token": "abc"}}, "Unknown setting discord.token"),
        ({"web": {"port": 70000}}, "web.port"),
        ({"models": {"m": {"decoder": "fast"}}}, "models.m.decoder = 'fast' is not allowed; use one of: vae, tiny"),
        ({"models": {"m": {"tiny_decoder": "t.pth"}}}, "models.m.tiny_decoder: the demo model 'tiny-t2v' has an embedded"),
        ({"scheduler": {"gpus_per_job": 0}}, "scheduler.gpus_per_job must be at least 1 (got 0)"),
        ({"scheduler": {"gpus_per_job": 2}},  # the default worker_devices is ["auto"]: one entry
         "scheduler.gpus_per_job = 2 needs scheduler.worker_devices to list a multiple of 2 devices"),
        ({"scheduler": {"gpus_per_job": 2, "worker_devices": ["0", "1", "2"]}},
         "it lists 3: ['0', '1', '2']"),
        ({"scheduler": {"gpus_per_job": 2, "worker_devices": ["auto", "auto"]}},
         "scheduler.worker_devices: \"auto\" cannot be part of a group of scheduler.gpus_per_job = 2"),
        ({"scheduler": {"gpus_per_job": 2, "worker_devices": ["0", "cpu"]}},
         "the group ['0', 'cpu'] mixes CPU and GPU entries"),
        ({"scheduler": {"gpus_per_job": 2, "worker_devices": ["0", "1", "1", "2"]}},
         "scheduler.worker_devices names GPU 1 more than once"),
    ],
)
def test_invalid_config_names_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data)
    assert needle in str(err.value)


def test_gpus_per_job_groups_consecutive_devices() -> None:
    s = settings_from_dict({"scheduler": {"gpus_per_job": 2, "worker_devices": ["0", "1", "2", "3"]}})
    assert s.scheduler.worker_groups == (("0", "1"), ("2", "3"))
    s = settings_from_dict({"scheduler": {"gpus_per_job": 2, "worker_devices": ["cpu", "cpu", "4", "5"]}})
    assert s.scheduler.worker_groups == (("cpu", "cpu"), ("4", "5"))  # "cpu" may repeat; a GPU may not
    s = settings_from_dict({"scheduler": {"worker_devices": ["auto", "0"]}})  # gpus_per_job 1: as before
    assert s.scheduler.worker_groups == (("auto",), ("0",))


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[engine\nattention = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_settings(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[database]\nurl = "sqlite+aiosqlite:///db/x.db"\n')
    s = load_settings(cfg)
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path.resolve()}/db/x.db"
    assert s.path("data/outputs") == tmp_path.resolve() / "data/outputs"


def test_secrets_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TB_TEST_TOKEN", raising=False)
    monkeypatch.delenv("TB_TEST_TOKEN_FILE", raising=False)
    assert read_secret("TB_TEST_TOKEN") is None
    secret = tmp_path / "tok"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("TB_TEST_TOKEN_FILE", str(secret))
    assert read_secret("TB_TEST_TOKEN") == "s3cret"
    monkeypatch.setenv("TB_TEST_TOKEN", "fromenv")
    assert read_secret("TB_TEST_TOKEN") == "fromenv"
    monkeypatch.delenv("TB_TEST_TOKEN")
    monkeypatch.setenv("TB_TEST_TOKEN_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_secret("TB_TEST_TOKEN")


# --- [defaults] and [limits] are one source: the default request always passes request validation ---------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bots.commands import build_request  # noqa: E402
from generator.request import ASPECTS, ATTENTIONS, RESOLUTIONS, SAMPLERS  # noqa: E402


def _default_requests_validate(s: Settings) -> None:
    """The plain request of each offered mode, built exactly as a chat message without flags builds it."""
    assert build_request(s, "t2v", "x").sla_topk == s.defaults.sla_topk
    assert build_request(s, "i2v", "", image="0" * 64).prompt


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"defaults": {"sla_topk": 0.8}}, "defaults.sla_topk = 0.8 is refused: SLA top-k must be from 0.01 to 0.5"),
        ({"defaults": {"sla_topk": 0.3}, "limits": {"max_topk": 0.2}}, "defaults.sla_topk = 0.3"),
        ({"defaults": {"frames": 9}, "limits": {"min_frames": 13}}, "defaults.frames = 9 is refused: Frames must be from 13"),
        ({"defaults": {"frames": 80}}, "defaults.frames = 80 is refused: Frames must be 1 more than a multiple of 4"),
        ({"defaults": {"i2v_prompt": "x" * 50}, "limits": {"max_prompt_chars": 20}}, "defaults.i2v_prompt"),
        ({"defaults": {"i2v_prompt": " "}}, "defaults.i2v_prompt"),
        ({"defaults": {"boundary": 1.5}}, "defaults.boundary = 1.5 is refused"),
        ({"limits": {"min_topk": 0.3, "max_topk": 0.2}}, "limits.min_topk and limits.max_topk"),
        ({"limits": {"max_topk": 1.5}}, "limits.min_topk and limits.max_topk"),
        ({"limits": {"min_frames": 6, "max_frames": 8}}, "holds no frame count"),
        ({"limits": {"min_frames": 20, "max_frames": 10}}, "limits.min_frames"),
        ({"limits": {"aspects": []}}, "limits.aspects must list at least one value"),
    ],
)
def test_defaults_outside_limits_are_refused_naming_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data)
    assert needle in str(err.value)


def test_wider_limits_admit_a_larger_default_topk() -> None:
    s = settings_from_dict({"defaults": {"sla_topk": 0.8}, "limits": {"max_topk": 0.9}})
    _default_requests_validate(s)


_limits = st.fixed_dictionaries(
    {
        "max_prompt_chars": st.integers(1, 900),
        "min_frames": st.integers(1, 90),
        "max_frames": st.integers(1, 120),
        "max_steps": st.integers(1, 4),
        "resolutions": st.lists(st.sampled_from(RESOLUTIONS), min_size=1, unique=True),
        "aspects": st.lists(st.sampled_from(ASPECTS), min_size=1, unique=True),
        "min_topk": st.floats(0.001, 1.0),
        "max_topk": st.floats(0.001, 1.0),
        "max_sigma": st.floats(1.0, 5000.0),
    }
)


@st.composite
def _valid_config(draw: st.DrawFn) -> dict:
    """Limits, then defaults drawn inside them: every such config must load."""
    lim = draw(_limits)
    lim["max_frames"] = max(lim["max_frames"], lim["min_frames"] + 3)
    lim["max_topk"] = max(lim["max_topk"], lim["min_topk"])
    frames = [f for f in range(lim["min_frames"], lim["max_frames"] + 1) if f % 4 == 1]
    prompt = draw(st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=lim["max_prompt_chars"]))
    defaults = {
        "resolution": draw(st.sampled_from(lim["resolutions"])),
        "aspect": draw(st.sampled_from(lim["aspects"])),
        "frames": draw(st.sampled_from(frames)),
        "steps": draw(st.integers(1, lim["max_steps"])),
        "sla_topk": draw(st.floats(lim["min_topk"], lim["max_topk"])),
        "sampler": draw(st.sampled_from(SAMPLERS)),
        "attention": draw(st.sampled_from(ATTENTIONS)),
        "boundary": draw(st.floats(0.0, 1.0)),
        "i2v_prompt": prompt,
    }
    return {"limits": lim, "defaults": defaults}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_config())
def test_every_valid_config_loads_and_its_default_request_validates(data: dict) -> None:
    _default_requests_validate(settings_from_dict(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _limits,
    st.fixed_dictionaries(
        {
            "frames": st.integers(1, 120),
            "steps": st.integers(1, 4),
            "sla_topk": st.floats(0.001, 1.0),
            "resolution": st.sampled_from(RESOLUTIONS),
            "aspect": st.sampled_from(ASPECTS),
            "boundary": st.floats(-0.5, 1.5),
        }
    ),
)
def test_any_config_either_loads_with_a_valid_default_request_or_names_the_key(limits: dict, defaults: dict) -> None:
    try:
        s = settings_from_dict({"limits": limits, "defaults": defaults})
    except ConfigError as exc:
        assert str(exc).startswith(("defaults.", "limits.")), str(exc)
        return
    _default_requests_validate(s)
