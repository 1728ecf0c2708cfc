"""The SLA Triton kernels run on CPU through the Triton interpreter (TRITON_INTERPRET=1), vs the reference.

Skipped when Triton is not installed. The interpreter must be on before the kernels are defined, so this
module sets it before importing them and skips if they were already compiled for a GPU in this process.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if "generator.attention.sla_triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already loaded without the interpreter", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

from generator.attention import sla_attention, sla_reference
from generator.attention.block_map import select_blocks
from generator.attention.reference import block_lut, linear_branch
from generator.attention.sla_triton import MAIN_CONFIGS, PREP_CONFIGS, kv_state, quantize_k, sla_forward


def qkv(b: int, length: int, h: int, d: int, seed: int, gain: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=g) for _ in range(3))
    return (q * gain).bfloat16(), k.bfloat16(), v.bfloat16()


def proj_for(d: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.normal_(0.0, 0.3)
    return proj


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    ("b", "length", "h", "d", "topk"),
    [
        (1, 300, 2, 32, 0.5),  # ragged tails in both block sizes
        (2, 256, 1, 16, 0.25),  # exact multiples, B=2
        (1, 200, 1, 64, 0.1),  # kb = 0 -> dense fallback
    ],
)
def test_triton_sla_matches_reference(b, length, h, d, topk):
    q, k, v = qkv(b, length, h, d, seed=length + d)
    proj = proj_for(d, seed=d)
    ref = sla_reference(q, k, v, proj, topk=topk)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    sla_forward(q, k, v, proj, topk=topk, out=out)
    assert not torch.isnan(out).any()
    assert rel(out, ref) < 5e-3
    sage = sla_attention(q, k, v, proj, topk=topk, backend="sagesla")
    assert not torch.isnan(sage).any()
    assert rel(sage, ref) < 2e-2


def test_block_selection_and_state_match_reference():
    q, k, v = qkv(2, 333, 2, 32, seed=1)
    lut, k_mean = select_blocks(q, k, 0.4, 128, 64)
    assert lut.dtype == torch.int32
    assert torch.equal(lut.long(), block_lut(q, k, 0.4))
    torch.testing.assert_close(k_mean, k.float().mean(dim=1), rtol=1e-5, atol=1e-6)
    kv, ksum = kv_state(k, v)
    phi_k = torch.softmax(k.float(), dim=-1)
    torch.testing.assert_close(kv.view(2, 2, 32, 32), torch.einsum("blhd,blhe->bhde", phi_k, v.float()),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ksum.view(2, 2, 32), phi_k.sum(1), rtol=1e-4, atol=1e-4)


def test_int8_k_quantization_round_trips():
    _, k, _ = qkv(1, 100, 1, 16, seed=2)
    k_mean = k.float().mean(dim=1)
    k8, scale, lpad = quantize_k(k, k_mean)
    assert lpad == 128 and k8.dtype == torch.int8
    assert bool((scale[0, 100:] == 0).all())
    back = k8[0, :100].float() * scale[0, :100, None]
    smoothed = k[0, :, 0].float() - k_mean[0]
    assert (back - smoothed).abs().max() <= scale[0, :100].max() / 2 + 1e-6


def test_no_linear_branch_and_given_lut():
    q, k, v = qkv(1, 256, 1, 16, seed=3)
    lut, _ = select_blocks(q, k, 0.5)
    out = sla_forward(q, k, v, None, lut=lut)
    ref = sla_reference(q, k, v, None, lut=lut.long())
    assert rel(out, ref) < 5e-3
    proj = proj_for(16, seed=5)
    with_linear = sla_forward(q, k, v, proj, lut=lut)
    assert rel(with_linear.float() - out.float(), proj(linear_branch(q, k, v))) < 2e-2


def test_topk_lut_exact_on_ties_near_ties_and_signs():
    from generator.attention.block_map import topk_lut

    one = 1.0
    near = float(torch.nextafter(torch.tensor(one, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)))
    rows = torch.tensor(
        [
            [3.0, -1.0, 3.0, 0.0, -0.0, 3.0, -7.5, 2.0],  # exact ties at the cut: lowest indices win
            [one, near, one, near, -near, -one, 0.5, near],  # differ only in the lowest mantissa bit
            [-3.0, -2.0, -1e-300, -5.0, -4.0, -1e300, -2.5, -1.0],  # all negative
        ],
        dtype=torch.float64,
    )
    for kb in (1, 3, 5, 8):
        got = topk_lut(rows, kb)
        for r in range(rows.shape[0]):
            order = sorted(range(rows.shape[1]), key=lambda j, r=r: (-float(rows[r, j]), j))
            assert got[r].tolist() == sorted(order[:kb]), (r, kb)


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("int8", [False, True])
def test_every_tuned_config_matches_reference(config, int8):
    # Ragged tails in both block sizes, B=2; each candidate the CUDA tuner may pick must compute SLA.
    q, k, v = qkv(2, 333, 2, 32, seed=7)
    proj = proj_for(32, seed=8)
    ref = sla_reference(q, k, v, proj, topk=0.5)
    out = torch.full_like(q, float("nan"))
    sla_forward(q, k, v, proj, topk=0.5, int8_qk=int8, out=out, config=config, prep_config=PREP_CONFIGS[-1])
    assert not torch.isnan(out).any()
    assert rel(out, ref) < (2e-2 if int8 else 5e-3)


@pytest.mark.parametrize("kb", [1, 2, 3])
def test_last_tile_masking_with_the_ragged_block_selected(kb):
    # A hand-made ascending LUT that always ends with the ragged last key block (300 = 4 x 64 + 44); odd kb
    # leaves half of the last 2-block tile empty. Only that tile is masked in the kernel.
    q, k, v = qkv(1, 300, 1, 16, seed=11)
    n_q, n_k = 3, 5
    g = torch.Generator().manual_seed(kb)
    rows = [sorted([*torch.randperm(n_k - 1, generator=g)[:kb - 1].tolist(), n_k - 1]) for _ in range(n_q)]
    lut = torch.tensor(rows, dtype=torch.int32).view(1, 1, n_q, kb)
    ref = sla_reference(q, k, v, None, lut=lut.long())
    for config in MAIN_CONFIGS:
        out = torch.full_like(q, float("nan"))
        sla_forward(q, k, v, None, lut=lut, out=out, config=config)
        assert not torch.isnan(out).any()
        assert rel(out, ref) < 5e-3, config.name
