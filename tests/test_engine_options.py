"""The engine's own options: built from the settings by the worker's side, the engine itself free of
settings, front ends and storage (the layering the import contracts in pyproject.toml state)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator.engine.api import ModelNotConfigured
from generator.engine.options import EngineOptions, ModelOptions
from generator.engine.runtime import TurboEngine
from generator.scheduler.engine_options import engine_options
from generator.scheduler.worker import DEFAULT_ENGINE_FACTORY, load_factory
from turbobot.config import EngineSettings, Settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_options_resolve_paths_against_the_config_folder(tmp_path: Path) -> None:
    s = settings_from_dict({
        "engine": {"device": "cpu", "compile_cache_dir": "cache", "i2v_model": "b"},
        "defaults": {"resolution": "720p", "aspect": "1:1", "frames": 33},
        "models": {
            "a": {"kind": "wan2.2-i2v-a14b", "transformer": "high", "transformer_low_noise": "/abs/low",
                  "vae": "vae.pth", "text_encoder": "t5.pth", "tokenizer": "tok", "label": "A"},
            "b": {"kind": "wan2.2-i2v-a14b", "transformer": "b", "transformer_low_noise": "b2", "vae": "v",
                  "text_encoder": "t"},
            "c": {"kind": "wan2.1-t2v-1.3b", "transformer": "c", "vae": "v", "text_encoder": "t",
                  "precision": "bf16"},
        },
    }, base_dir=str(tmp_path))
    o = engine_options(s)
    assert o.device == "cpu" and o.compile_cache_dir == tmp_path / "cache"
    assert (o.warm_up_resolution, o.warm_up_aspect, o.warm_up_frames) == ("720p", "1:1", 33)
    a = o.models["a"]
    assert a.transformer == tmp_path / "high" and a.transformer_low_noise == Path("/abs/low")
    assert (a.vae, a.text_encoder, a.tokenizer) == (tmp_path / "vae.pth", tmp_path / "t5.pth", tmp_path / "tok")
    assert a.tiny_decoder is None and a.label == "A" and o.models["c"].precision == "bf16"
    assert o.model_names("i2v") == s.model_names("i2v") == ("b", "a")
    assert o.model_names("t2v") == s.model_names("t2v") == ("c",)


def test_no_models_configured_means_the_embedded_demo_pair() -> None:
    o = engine_options(Settings())
    assert {n: m.kind for n, m in o.models.items()} == {"tiny-t2v": "tiny-t2v", "tiny-i2v": "tiny-i2v"}
    assert EngineOptions().models == o.models
    assert EngineOptions(models={"x": ModelOptions(kind="tiny-i2v")}).model_names("i2v") == ("x",)


def test_the_workers_default_factory_builds_the_engine_from_settings() -> None:
    engine = load_factory(DEFAULT_ENGINE_FACTORY)(Settings(engine=EngineSettings(device="cpu", attention="dense")))
    assert isinstance(engine, TurboEngine)
    assert engine.options.attention == "dense" and str(engine.device) == "cpu"
    assert engine.info["default_t2v"] == "tiny-t2v"


def test_engine_attention_and_media_load_no_upper_layer() -> None:
    """In a fresh interpreter, importing the engine (with its runtime), attention and media modules loads
    nothing of the front ends, the scheduler, storage or the settings."""
    code = (
        "import json, sys\n"
        "import generator.engine, generator.engine.runtime, generator.engine.options, generator.attention\n"
        "import generator.media\n"
        "bad = ('bots', 'storage', 'turbobot', 'generator.scheduler')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in bad[:3]"
        " or m.startswith(bad[3]))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=240, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_options_without_a_models_files_are_refused_by_name() -> None:
    engine = TurboEngine(EngineOptions(device="cpu", models={"m": ModelOptions(kind="wan2.1-t2v-1.3b")}))
    with pytest.raises(ModelNotConfigured, match=r"models\.m\.transformer must name a local file"):
        engine.load()


@pytest.mark.parametrize("contract", ["layers", "engine", "media", "front-ends", "bottom"])
def test_import_contract_holds(contract: str) -> None:
    """Each import-linter contract of pyproject.toml, run as CI runs it (skipped without import-linter)."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([exe, "--contract", contract], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
