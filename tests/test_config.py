"""config.toml: the shipped file equals the built-in defaults; bad values are named clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbobot.config import ConfigError, Settings, load_settings, read_secret, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_matches_defaults() -> None:
    shipped = load_settings(ROOT / "config.toml")
    builtin = Settings()
    for section in ("app", "database", "engine", "defaults", "limits", "quotas", "scheduler", "admin", "discord", "telegram", "web"):
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
        ({"defaults": {"frames": 80}}, "defaults.frames must be 1 mod 4"),
        ({"defaults": {"resolution": "720p"}, "limits": {"resolutions": ["480p"]}}, "defaults.resolution"),
        ({"models": {"big": {"kind": "wan2.1-t2v-14b"}}}, "models.big.transformer must be set"),
        ({"models": {"big": {"kind": "wan3"}}}, "models.big.kind = 'wan3' is not allowed"),
        ({"engine": {"t2v_model": "nope"}}, "engine.t2v_model = 'nope' is not a configured t2v model"),
        ({"discord": {"token": "abc"}}, "Unknown setting discord.token"),
        ({"web": {"port": 70000}}, "web.port"),
        ({"models": {"m": {"decoder": "fast"}}}, "models.m.decoder = 'fast' is not allowed; use one of: vae, tiny"),
        ({"models": {"m": {"tiny_decoder": "t.pth"}}}, "models.m.tiny_decoder: the demo model 'tiny-t2v' has an embedded"),
    ],
)
def test_invalid_config_names_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data)
    assert needle in str(err.value)


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
