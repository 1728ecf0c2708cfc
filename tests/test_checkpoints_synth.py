"""Synthetic TurboDiffusion checkpoints (written independently of the loader) and key-layout checks.

The helpers here turn a diffusers state dict into the TurboDiffusion layout with an explicit key table and
an independent per-tile quantizer; the loading tests in test_checkpoints_loading.py use them. The tests
here check the layout at the real model sizes on the meta device (no real-size allocation).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from generator.engine import checkpoints as ckpt
from generator.engine.api import CheckpointError
from generator.engine.quant import dequantize_tiles, quantize_tiles, scale_grid_shape
from generator.engine.transformer import build_transformer
from generator.engine.wan_configs import wan_config

TINY: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 192,  # > 128: the ffn weights span two quantization tiles, the second one partial
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}

# diffusers name -> TurboDiffusion name, outside the blocks.
TOP_KEYS = {
    "patch_embedding.weight": "patch_embedding.weight",
    "patch_embedding.bias": "patch_embedding.bias",
    "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
    "condition_embedder.text_embedder.linear_1.bias": "text_embedding.0.bias",
    "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
    "condition_embedder.text_embedder.linear_2.bias": "text_embedding.2.bias",
    "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
    "condition_embedder.time_embedder.linear_1.bias": "time_embedding.0.bias",
    "condition_embedder.time_embedder.linear_2.weight": "time_embedding.2.weight",
    "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
    "condition_embedder.time_proj.weight": "time_projection.1.weight",
    "condition_embedder.time_proj.bias": "time_projection.1.bias",
    "scale_shift_table": "head.modulation",
    "proj_out.weight": "head.head.weight",
    "proj_out.bias": "head.head.bias",
}
# diffusers name -> TurboDiffusion name, inside ``blocks.i.``.
BLOCK_KEYS = {
    "scale_shift_table": "modulation",
    "attn1.to_q.weight": "self_attn.q.weight",
    "attn1.to_q.bias": "self_attn.q.bias",
    "attn1.to_k.weight": "self_attn.k.weight",
    "attn1.to_k.bias": "self_attn.k.bias",
    "attn1.to_v.weight": "self_attn.v.weight",
    "attn1.to_v.bias": "self_attn.v.bias",
    "attn1.to_out.0.weight": "self_attn.o.weight",
    "attn1.to_out.0.bias": "self_attn.o.bias",
    "attn1.norm_q.weight": "self_attn.norm_q.weight",
    "attn1.norm_k.weight": "self_attn.norm_k.weight",
    "attn1.proj_l.weight": "self_attn.attn_op.local_attn.proj_l.weight",
    "attn1.proj_l.bias": "self_attn.attn_op.local_attn.proj_l.bias",
    "attn2.to_q.weight": "cross_attn.q.weight",
    "attn2.to_q.bias": "cross_attn.q.bias",
    "attn2.to_k.weight": "cross_attn.k.weight",
    "attn2.to_k.bias": "cross_attn.k.bias",
    "attn2.to_v.weight": "cross_attn.v.weight",
    "attn2.to_v.bias": "cross_attn.v.bias",
    "attn2.to_out.0.weight": "cross_attn.o.weight",
    "attn2.to_out.0.bias": "cross_attn.o.bias",
    "attn2.norm_q.weight": "cross_attn.norm_q.weight",
    "attn2.norm_k.weight": "cross_attn.norm_k.weight",
    "norm2.weight": "norm3.weight",
    "norm2.bias": "norm3.bias",
    "ffn.net.0.proj.weight": "ffn.0.weight",
    "ffn.net.0.proj.bias": "ffn.0.bias",
    "ffn.net.2.weight": "ffn.2.weight",
    "ffn.net.2.bias": "ffn.2.bias",
}
# The 10 linears per block that -quant files store as int8 tiles (TurboDiffusion names).
QUANT_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
# Kept in fp32 in the released files; everything else is bf16.
FP32_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")


def turbo_name(diffusers_key: str) -> str:
    if diffusers_key.startswith("blocks."):
        _, idx, rest = diffusers_key.split(".", 2)
        return f"blocks.{idx}.{BLOCK_KEYS[rest]}"
    return TOP_KEYS[diffusers_key]


def quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile int8 quantization, tile by tile: q = round(w*128/amax) in [-128, 127], scale = amax/128."""
    out_f, in_f = w.shape
    n_o, n_i = math.ceil(out_f / 128), math.ceil(in_f / 128)
    q = torch.zeros(out_f, in_f, dtype=torch.int8)
    scale = torch.zeros(n_o, n_i, dtype=torch.float32)
    for i in range(n_o):
        for j in range(n_i):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = tile.abs().max()
            scale[i, j] = amax / 128
            if amax > 0:
                q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (
                    torch.round(tile * 128 / amax).clamp(-128, 127).to(torch.int8)
                )
    return q, scale


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    w = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    return w


def to_turbo_layout(
    sd: dict[str, torch.Tensor], *, quant: bool = False, wrap: bool = False, patch_2d: bool = True
) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the TurboDiffusion layout and dtypes (optionally -quant, optionally with
    activation-checkpoint wrapper infixes, optionally the original Wan 5-D patch embedding)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        name = turbo_name(key)
        t = t.detach()
        if name == "patch_embedding.weight" and patch_2d:
            t = t.reshape(t.shape[0], -1)
        t = t.float() if name.endswith(FP32_SUFFIXES) else t.to(torch.bfloat16)
        if quant and name.startswith("blocks.") and name.endswith(".weight"):
            linear = name.split(".", 2)[2].removesuffix(".weight")
            if linear in QUANT_LINEARS:
                base = name.removesuffix(".weight")
                q, s = quantize_reference(sd[key].float())
                out[f"{base}.int8_weight"] = q
                out[f"{base}.scale"] = s
                continue
        out[name] = t.clone()
    if wrap:  # FSDP activation checkpointing wraps each block: blocks.i._checkpoint_wrapped_module.<rest>
        wrapped = {}
        for k, v in out.items():
            if k.startswith("blocks."):
                _, idx, rest = k.split(".", 2)
                k = f"blocks.{idx}._checkpoint_wrapped_module.{rest}"
            wrapped[k] = v
        out = wrapped
    return out


def meta_turbo_shapes(config: dict[str, Any], *, sla: bool = True, quant: bool = False) -> dict[str, tuple]:
    """TurboDiffusion key -> shape for a real config, from a meta-device model (no allocation)."""
    model = build_transformer(config, device="meta")
    shapes: dict[str, tuple] = {}
    for key, t in model.state_dict().items():
        if not sla and ".proj_l." in key:
            continue
        name = turbo_name(key)
        shape = tuple(t.shape)
        if name == "patch_embedding.weight":
            shape = (shape[0], math.prod(shape[1:]))
        linear = name.split(".", 2)[2].removesuffix(".weight") if name.startswith("blocks.") else ""
        if quant and name.endswith(".weight") and linear in QUANT_LINEARS:
            base = name.removesuffix(".weight")
            shapes[f"{base}.int8_weight"] = shape
            shapes[f"{base}.scale"] = scale_grid_shape(*shape)
            continue
        shapes[name] = shape
    return shapes


# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sla", "quant", "count", "label"),
    [
        ("wan2.1-t2v-1.3b", True, False, 885, "Wan2.1-T2V-1.3B"),
        ("wan2.1-t2v-14b", True, False, 1175, "Wan2.1-T2V-14B"),
        ("wan2.2-i2v-a14b", True, False, 1175, "Wan2.2-I2V-A14B expert"),
        ("wan2.1-t2v-1.3b", True, True, 1185, "Wan2.1-T2V-1.3B"),
        ("wan2.1-t2v-1.3b", False, False, 825, "Wan2.1-T2V-1.3B"),
    ],
)
def test_real_layouts_map_every_key(name: str, sla: bool, quant: bool, count: int, label: str) -> None:
    config = wan_config(name)
    shapes = meta_turbo_shapes(config, sla=sla, quant=quant)
    assert len(shapes) == count
    conv = ckpt.convert_keys(shapes)
    assert conv.layout == "turbodiffusion"
    assert conv.unmapped == []
    info = ckpt.classify(shapes, conv, path="x.pth")
    assert (info.model, info.sla, info.quant, info.key_count) == (label, sla, quant, count)
    assert info.head_dim == (128 if sla else None)
    ckpt.check_compatible(info, config, need_sla=sla, quantized=quant)
    # Every converted key lands on the model's own key with its shape.
    expected = {
        k: tuple(t.shape)
        for k, t in build_transformer(config, device="meta").state_dict().items()
        if sla or ".proj_l." not in k
    }
    ckpt.check_keys(info, ckpt.target_shapes(shapes, conv), expected)


def test_key_rules_by_name() -> None:
    m = ckpt.turbo_to_diffusers_key
    assert m("head.modulation") == "scale_shift_table"
    assert m("blocks.7.modulation") == "blocks.7.scale_shift_table"
    assert m("head.head.weight") == "proj_out.weight"
    assert m("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert m("blocks.0.self_attn.o.int8_weight") == "blocks.0.attn1.to_out.0.int8_weight"
    assert m("blocks.0.cross_attn.k.scale") == "blocks.0.attn2.to_k.scale"
    assert m("blocks.2.ffn.0.bias") == "blocks.2.ffn.net.0.proj.bias"
    assert m("blocks.1._checkpoint_wrapped_module.self_attn.attn_op.local_attn.proj_l.weight") == (
        "blocks.1.attn1.proj_l.weight"
    )
    assert m("blocks.0.norm2.weight") is None  # the released files have no affine norm2
    assert m("img_emb.proj.0.weight") is None


def test_size_mismatch_names_both_models() -> None:
    shapes = meta_turbo_shapes(wan_config("wan2.1-t2v-14b"), quant=True)
    info = ckpt.classify(shapes, ckpt.convert_keys(shapes), path="/w/TurboWan2.1-T2V-14B-480P-quant.pth")
    with pytest.raises(CheckpointError) as err:
        ckpt.check_compatible(info, wan_config("wan2.1-t2v-1.3b"), need_sla=True)
    msg = str(err.value)
    assert "TurboDiffusion Wan2.1-T2V-14B checkpoint" in msg
    assert "int8 -quant" in msg and "1575 keys" in msg  # 1175 + 10 int8 linears x 40 blocks
    assert "configured model is Wan2.1-T2V-1.3B" in msg
    assert "dim 5120 (configured 1536)" in msg and "num_layers 40 (configured 30)" in msg


def test_i2v_expert_vs_t2v_config() -> None:
    shapes = meta_turbo_shapes(wan_config("wan2.2-i2v-a14b"))
    info = ckpt.classify(shapes, ckpt.convert_keys(shapes), path="high.pth")
    with pytest.raises(CheckpointError, match=r"in_channels 36 \(configured 16\)"):
        ckpt.check_compatible(info, wan_config("wan2.1-t2v-14b"), need_sla=True)


@pytest.mark.parametrize("shape", [(300, 260), (128, 128), (64, 192), (1, 5)])
def test_quantize_tiles_matches_reference(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    w = torch.randn(*shape) * torch.linspace(0.1, 3.0, shape[1])  # tiles of different ranges
    w[:, :1] = 0.0 if shape[1] > 128 else w[:, :1]
    q, s = quantize_tiles(w)
    q_ref, s_ref = quantize_reference(w)
    assert s.shape == scale_grid_shape(*shape) == s_ref.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    deq = dequantize_tiles(q, s)
    assert torch.equal(deq, dequantize_reference(q_ref, s_ref))
    # Rounding error at most half a step, a full step where 128 saturates to 127.
    step = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert torch.all((deq - w).abs() <= step + 1e-7)


def test_all_zero_tile_quantizes_to_zero() -> None:
    w = torch.zeros(130, 4)
    w[129, 0] = 2.0
    q, s = quantize_tiles(w)
    assert s[0, 0] == 0 and torch.all(q[:128] == 0)
    assert dequantize_tiles(q, s)[129, 0] == 2.0 * 127 / 128  # 128 saturates to 127
