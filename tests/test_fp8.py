"""fp8 linears (generator.engine.fp8) on the CPU: the quantize/scale logic against float references, which
layers convert, and loading plain and -quant checkpoints straight into fp8. The GPU path (``torch._scaled_mm``)
computes the same quantized product; bench/fp8_accuracy.py measures it against bf16 at the real sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_checkpoints_synth import TINY, to_turbo_layout
from torch import nn

from generator.engine import fp8
from generator.engine.api import EngineError
from generator.engine.runtime import TurboEngine, dit_param_bytes
from generator.engine.transformer import build_transformer, load_transformer
from generator.engine.wan_configs import wan_config
from generator.scheduler.engine_options import engine_options
from turbobot.config import settings_from_dict

# e4m3: 3 mantissa bits. A normal value rounds to within half a unit in the last place, 2^-4 of its
# magnitude; below the smallest normal (2^-6 of the row's scale unit) the spacing is fixed at 2^-9, so the
# absolute error there is at most 2^-10 times the row scale.
REL_ROUNDING = 2.0**-4
SUBNORMAL_ABS = 2.0**-10


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 2, 24, 24, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_quantize_rows_scales_and_rounding_bound() -> None:
    g = torch.Generator().manual_seed(0)
    # Rows spanning many orders of magnitude, with a zero row and tiny values mixed in.
    x = torch.randn(64, 300, generator=g) * torch.logspace(-4, 4, 64)[:, None]
    x[5] = 0.0
    x[7, :10] = 1e-9
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8 and q.shape == x.shape and scale.shape == (64, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    nonzero = amax[:, 0] > 0
    torch.testing.assert_close(scale[nonzero], amax[nonzero] / fp8.FP8_MAX, rtol=1e-6, atol=0)
    # The largest magnitude of every row maps to 448 exactly: nothing saturates.
    assert torch.all(q.float().abs().amax(dim=1)[nonzero] == fp8.FP8_MAX)
    deq = fp8.dequantize_rows(q, scale)
    err = (deq - x).abs()
    bound = torch.maximum(REL_ROUNDING * x.abs(), SUBNORMAL_ABS * scale) * (1 + 1e-6)
    assert torch.all(err <= bound), float((err - bound).max())
    assert torch.all(deq[5] == 0)


def test_fp8_linear_is_the_product_of_the_quantized_operands() -> None:
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(96, generator=g))
    x = torch.randn(3, 50, 256, generator=g)
    layer = fp8.Fp8Linear.from_linear(lin, out_dtype=torch.float32)
    assert layer.weight.dtype == fp8.FP8 and layer.weight_scale.shape == (96, 1)
    out = layer(x)
    assert out.shape == (3, 50, 96) and out.dtype == torch.float32

    # Independently: quantize x per token and W per output channel, multiply in float64.
    xq, xs = fp8.quantize_rows(x.reshape(-1, 256))
    wq, ws = fp8.quantize_rows(lin.weight)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t() + lin.bias.double()
    # Same operands, float32 vs float64 accumulation over 256 terms: ~1e-6 relative.
    torch.testing.assert_close(out.reshape(-1, 96).double(), ref, rtol=1e-5, atol=1e-5)

    # Against the float32 layer: inside the stated fp8 error budget, and clearly not exact.
    with torch.no_grad():
        err = _rel_l2(out, lin(x))
    assert 1e-3 < err < fp8.LINEAR_REL_L2_BOUND, err


def test_convert_touches_only_the_block_linears() -> None:
    torch.manual_seed(0)
    model = build_transformer(TINY, attention="sla", sla_topk=0.5)
    before = {n: type(m) for n, m in model.named_modules()}
    n = fp8.convert_to_fp8(model, out_dtype=torch.float32)
    assert n == 10 * TINY["num_layers"]
    converted = {name for name, m in model.named_modules() if isinstance(m, fp8.Fp8Linear)}
    assert converted == set(fp8.block_linear_names(model))
    for name, m in model.named_modules():
        if name not in converted and isinstance(m, nn.Linear):
            assert before[name] is nn.Linear  # proj_l, embedders, head: unchanged
    assert isinstance(model.blocks[0].attn1.proj_l, nn.Linear)
    assert fp8.convert_to_fp8(model) == 0  # idempotent


def test_whole_forward_error_of_fp8_against_float() -> None:
    torch.manual_seed(0)
    ref_model = build_transformer(TINY, attention="sla", sla_topk=0.5)
    torch.manual_seed(0)
    q_model = build_transformer(TINY, attention="sla", sla_topk=0.5, precision="fp8")
    assert q_model.turbo_precision == "fp8"
    with torch.no_grad():
        ref = ref_model(**_inputs(), return_dict=False)[0]
        out = q_model(**_inputs(), return_dict=False)[0]
    err = _rel_l2(out, ref)
    # Two blocks of fp8 linears in a residual stream: no worse than one linear's budget.
    assert 1e-4 < err < fp8.LINEAR_REL_L2_BOUND, err


@pytest.mark.parametrize("quant", [False, True], ids=["plain", "quant"])
def test_checkpoint_loads_straight_into_fp8(quant: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_transformer(TINY, attention="sla", sla_topk=0.5)
    path = tmp_path / ("w-quant.pth" if quant else "w.pth")
    torch.save(to_turbo_layout(source.state_dict(), quant=quant), path)
    bf = load_transformer(path, config=TINY, attention="sla", sla_topk=0.5)
    q = load_transformer(path, config=TINY, attention="sla", sla_topk=0.5, precision="fp8")
    assert q.turbo_precision == "fp8" and q.turbo_checkpoint.quant == quant
    names = set(fp8.block_linear_names(q))
    for name in names:
        layer = q.get_submodule(name)
        assert isinstance(layer, fp8.Fp8Linear) and layer.weight.dtype == fp8.FP8
        w = bf.get_submodule(name).weight.float()  # what the float path loads (int8 tiles dequantized)
        deq = fp8.dequantize_rows(layer.weight, layer.weight_scale)
        bound = torch.maximum(REL_ROUNDING * w.abs(), SUBNORMAL_ABS * layer.weight_scale) * (1 + 1e-6)
        assert torch.all((deq - w).abs() <= bound), name
        torch.testing.assert_close(layer.bias.float(), bf.get_submodule(name).bias.float(), rtol=0, atol=0)
    sd_q, sd_bf = q.state_dict(), bf.state_dict()
    for k, v in sd_bf.items():  # everything outside the fp8 linears loads exactly as before
        if k.rpartition(".")[0] not in names:
            assert torch.equal(sd_q[k], v), k  # same file, same conversion, no arithmetic: bit-identical
    with torch.no_grad():
        err = _rel_l2(q(**_inputs(), return_dict=False)[0], bf(**_inputs(), return_dict=False)[0])
    assert err < fp8.LINEAR_REL_L2_BOUND, err


def test_precision_resolution_and_forced_fp8_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert fp8.resolve_precision("auto", cpu) == "bf16"
    assert fp8.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match=r"precision = \"fp8\" needs a GPU with fp8 tensor cores.*the CPU"):
        fp8.resolve_precision("fp8", cpu)
    settings = settings_from_dict({"engine": {"device": "cpu"}, "models": {
        "big": {"kind": "wan2.1-t2v-1.3b", "transformer": "x", "vae": "v", "text_encoder": "t",
                "tokenizer": "k", "precision": "fp8"}}})
    engine = TurboEngine(engine_options(settings))
    with pytest.raises(EngineError, match=r"models\.big: precision = \"fp8\".*the CPU") as info:
        engine.load()  # refused before any file is opened
    assert info.value.code == "precision_unsupported"


def test_memory_planner_counts_fp8_bytes() -> None:
    cfg = wan_config("wan2.1-t2v-14b")
    bf16, f8 = dit_param_bytes(cfg, "bf16"), dit_param_bytes(cfg, "fp8")
    assert f8 * 2 == bf16
    assert 13e9 < f8 < 15e9  # the 14B DiT is ~14 GB in fp8 (docs/engine.md: 14.3 B parameters)
    # Two fp8 experts + umT5-XXL (~11.4 GB) + VAE fit the 70% weight budget of an 80 GB card.
    assert 2 * f8 + 11.4e9 + 0.3e9 < 0.70 * 80 * 2**30
    torch.manual_seed(0)
    small = build_transformer(TINY)
    before = fp8.weight_bytes(small)
    fp8.convert_to_fp8(small)
    assert fp8.weight_bytes(small) < before
