"""A configured (non-demo) model from files on disk, in the layouts users download: the engine's real loading
path (DiT folder, original umT5 .pth + tokenizer folder, original Wan2.1_VAE.pth) at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_synth import wan_t5_state_dict, wan_vae_state_dict

from generator import media
from generator.engine import create_engine, wan_configs
from generator.engine.api import CheckpointError, RenderJob
from generator.engine.tiny import tiny_tokenizer, tiny_transformer_config
from generator.engine.transformer import build_transformer
from generator.request import GenerationRequest
from generator.scheduler.engine_options import engine_options
from turbobot.config import Settings, settings_from_dict

TEXT_DIM = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    cfg = {**tiny_transformer_config("tiny-t2v"), "patch_size": (1, 2, 2), "text_dim": TEXT_DIM}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build_transformer(cfg).save_pretrained(root / "dit")
    torch.save(wan_t5_state_dict(vocab=259, dim=TEXT_DIM), root / "models_t5_umt5-xxl-enc-bf16.pth")
    tiny_tokenizer().save_pretrained(root / "umt5-xxl")
    torch.save(wan_vae_state_dict(dim=2), root / "Wan2.1_VAE.pth")
    return root


@pytest.fixture()
def small_wan(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine looks the DiT shape up by kind; make "wan2.1-t2v-1.3b" tiny for this test.
    cfg = {**tiny_transformer_config("tiny-t2v"), "patch_size": (1, 2, 2), "text_dim": TEXT_DIM}
    monkeypatch.setitem(wan_configs.WAN_CONFIGS, "wan2.1-t2v-1.3b", cfg)


def settings(root: Path, **model: str) -> Settings:
    entry = {"kind": "wan2.1-t2v-1.3b", "transformer": "dit", "vae": "Wan2.1_VAE.pth",
             "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth", "tokenizer": "umt5-xxl", "label": "Small Wan", **model}
    return settings_from_dict({"engine": {"device": "cpu"}, "models": {"small": entry}}, base_dir=str(root))


def test_configured_model_renders_through_the_same_path(model_dir: Path, small_wan: None, tmp_path: Path) -> None:
    eng = create_engine(engine_options(settings(model_dir)))
    eng.load()
    req = GenerationRequest(mode="t2v", prompt="a small boat", model="small", frames=5, steps=2, seed=3)
    res = eng.render(RenderJob(job_id=2, request=req, output_path=tmp_path / "o.mp4"),
                     progress=lambda _p: None, cancelled=lambda: False)
    assert not res.is_demo and res.model_label == "Small Wan"
    assert (res.width, res.height, res.frames) == (832, 480, 5)
    assert media.is_playable_h264(res.path)
    b = eng._bundle("small")
    assert b.dtype == torch.bfloat16 and b.experts[0].patch_embedding.weight.dtype == torch.bfloat16
    assert eng.last_attention == "sla"  # real weights: "auto" is SLA even on the CPU


def test_misconfigured_paths_fail_with_the_file_named(model_dir: Path, small_wan: None) -> None:
    eng = create_engine(engine_options(settings(model_dir, vae="models_t5_umt5-xxl-enc-bf16.pth")))
    with pytest.raises(CheckpointError, match=r"not a Wan2\.1 VAE"):
        eng.load()
