"""Our self-attention processor against diffusers' stock one, the SLA reference, and run-time switching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers import transformer_wan
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from test_checkpoints_synth import TINY

import generator
from generator.attention import sla_reference
from generator.engine.api import EngineError
from generator.engine.transformer import (
    TurboSelfAttnProcessor,
    build_transformer,
    load_transformer,
    set_attention,
)


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    torch.manual_seed(5)
    return build_transformer(TINY, attention="sla")


def _attn_inputs(model: WanTransformer3DModel) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(1, 4, 2, 24, 24, generator=g)  # 2 x 12 x 12 = 288 tokens
    hidden = torch.randn(1, 288, 64, generator=g)
    return hidden, model.rope(latents)


def test_dense_processor_equals_stock(model: WanTransformer3DModel) -> None:
    attn = model.blocks[0].attn1
    hidden, rope = _attn_inputs(model)
    with torch.no_grad():
        ours = TurboSelfAttnProcessor("dense")(attn, hidden, None, None, rope)
        stock = WanAttnProcessor()(attn, hidden, None, None, rope)
    # Two code paths over the same weights: BLAS kernel choice (CPU, alignment) may reorder sums. float32
    # u ~ 6e-8, dot products of <= 288 terms on values ~1: ~1e-6 typical, 1.7e-5 worst case.
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [0.1, 0.5])
def test_sla_processor_equals_reference(
    model: WanTransformer3DModel, topk: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    attn = model.blocks[1].attn1
    hidden, rope = _attn_inputs(model)
    calls = []

    def reference_dispatch(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **_: object
    ) -> torch.Tensor:
        calls.append(query.shape)
        return sla_reference(query, key, value, attn.proj_l, topk=topk)

    with torch.no_grad():
        ours = TurboSelfAttnProcessor("sla", topk)(attn, hidden, None, None, rope)
        dense = TurboSelfAttnProcessor("dense")(attn, hidden, None, None, rope)
        # diffusers' own projections / norms / RoPE, with the attention op replaced by the SLA reference.
        monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", reference_dispatch)
        expected = WanAttnProcessor()(attn, hidden, None, None, rope)
    assert calls == [torch.Size([1, 288, 2, 32])]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (ours - dense).abs().max() > 1e-3
    # CPU has no int8 kernel: "sagesla" runs the same SLA math there.
    with torch.no_grad():
        sage = TurboSelfAttnProcessor("sagesla", topk)(attn, hidden, None, None, rope)
    torch.testing.assert_close(sage, ours, rtol=0, atol=1e-6)  # same function, separate calls


def test_set_attention_switches_every_block(model: WanTransformer3DModel) -> None:
    try:
        assert set_attention(model, "auto", 0.15) == "sla"
        procs = {id(b.attn1.processor) for b in model.blocks}
        assert len(procs) == 1
        proc = model.blocks[0].attn1.processor
        assert (proc.mode, proc.topk) == ("sla", 0.15)
        assert all(type(b.attn2.processor) is WanAttnProcessor for b in model.blocks)  # cross-attn untouched
        assert set_attention(model, "dense", 0.1) == "dense" and model.turbo_attention == "dense"
        assert model.blocks[1].attn1.processor.mode == "dense"
        with pytest.raises(ValueError, match="unknown attention"):
            set_attention(model, "flash", 0.1)
        with pytest.raises(ValueError, match="sla_topk"):
            set_attention(model, "sla", 0.0)
    finally:
        set_attention(model, "sla", 0.1)


def test_model_without_proj_l_refuses_sla(tmp_path: Path) -> None:
    torch.manual_seed(2)
    stock = WanTransformer3DModel(**TINY)
    path = tmp_path / "stock"
    stock.save_pretrained(path)
    model = load_transformer(path, config=TINY, attention="dense")
    with pytest.raises(EngineError) as err:
        set_attention(model, "sagesla", 0.1)
    assert err.value.code == "attention_unavailable"
    assert set_attention(model, "auto", 0.1) == "dense"


def test_build_transformer_layout_and_dtypes() -> None:
    torch.manual_seed(0)
    m = build_transformer(TINY, dtype=torch.bfloat16)
    sd = m.state_dict()
    assert sd["blocks.1.attn1.proj_l.weight"].shape == (32, 32) and sd[
        "blocks.1.attn1.proj_l.bias"
    ].shape == (32,)
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert sd["scale_shift_table"].dtype == torch.float32 and sd["blocks.0.norm2.bias"].dtype == torch.float32
    assert sd["blocks.0.norm2.weight"].eq(1).all() and sd["blocks.0.attn1.norm_q.weight"].eq(1).all()
    assert not any(p.requires_grad for p in m.parameters())
    m.to(torch.float64)  # proj_l is a registered submodule: it moves/casts with the model
    assert m.blocks[0].attn1.proj_l.weight.dtype == torch.float64
    meta = build_transformer(TINY, device="meta")
    assert meta.blocks[0].attn1.proj_l.weight.is_meta and meta.state_dict().keys() == sd.keys()
    # Same seed, same weights.
    torch.manual_seed(0)
    again = build_transformer(TINY, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(again[k], v) for k, v in sd.items())


def test_public_entry_point_is_lazy() -> None:
    assert generator.load_transformer is load_transformer
    code = "import sys, generator; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
