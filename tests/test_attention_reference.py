"""CPU tests of the pure-torch SLA reference against a naive, loop-based float64 reading of docs/engine.md section 7."""

from __future__ import annotations

import math

import pytest
import torch

from generator.attention import dense_attention, sla_attention, sla_block_map, sla_reference
from generator.attention.reference import block_lut, linear_branch, pool_blocks


def naive_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, bq: int, bk: int) -> torch.Tensor:
    """Explicit loops over (b, h, block): mean of real tokens, smoothed k, dot products, top kb."""
    q, k = q.double(), k.double()
    b_, length, h_, _ = q.shape
    n_q, n_k = math.ceil(length / bq), math.ceil(length / bk)
    kb = min(n_k, int(topk * n_k))
    out = torch.zeros(b_, h_, n_q, n_k, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            ks = k[b, :, h] - k[b, :, h].mean(dim=0)
            pq = [q[b, i * bq : min(length, (i + 1) * bq), h].mean(dim=0) for i in range(n_q)]
            pk = [ks[j * bk : min(length, (j + 1) * bk)].mean(dim=0) for j in range(n_k)]
            for i in range(n_q):
                scores = [float(pq[i] @ pk[j]) for j in range(n_k)]
                order = sorted(range(n_k), key=lambda j, s=scores: -s[j])
                for j in order if kb == 0 else order[:kb]:
                    out[b, h, i, j] = True
    return out


def naive_sla(q, k, v, proj: torch.nn.Linear | None, topk: float, bq: int, bk: int) -> torch.Tensor:
    """Token-by-token float64 SLA: softmax over the selected keys, linear branch, proj_l."""
    q, k, v = q.double(), k.double(), v.double()
    b_, length, h_, d = q.shape
    sel = naive_block_map(q, k, topk, bq, bk)
    out = torch.zeros_like(q)
    for b in range(b_):
        for h in range(h_):
            phi_k = torch.softmax(k[b, :, h], dim=-1)
            kv = phi_k.T @ v[b, :, h]
            ksum = phi_k.sum(dim=0)
            for t in range(length):
                keys = [j for j in range(length) if sel[b, h, t // bq, j // bk]]
                s = k[b, keys, h] @ q[b, t, h] / math.sqrt(d)
                o = torch.softmax(s, dim=0) @ v[b, keys, h]
                if proj is not None:
                    phi_q = torch.softmax(q[b, t, h], dim=0)
                    o_l = (phi_q @ kv) / (phi_q @ ksum + 1e-5)
                    o = o + proj.weight.double() @ o_l + proj.bias.double()
                out[b, t, h] = o
    return out


def rand_qkv(b: int, length: int, h: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, h, d, generator=g, dtype=dtype) for _ in range(3))


def rand_proj(d: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.mul_(3.0)  # make the linear branch matter in the comparison
    return proj


@pytest.mark.parametrize(
    ("b", "length", "h", "d", "topk", "bq", "bk"),
    [
        (1, 70, 2, 16, 0.5, 16, 8),  # ragged: 70 = 4*16+6 and 8*8+6
        (2, 48, 1, 8, 0.34, 16, 8),  # exact multiples, B=2
        (1, 37, 1, 8, 0.6, 32, 16),  # one full and one partial query block
    ],
)
def test_reference_matches_naive(b, length, h, d, topk, bq, bk):
    q, k, v = rand_qkv(b, length, h, d, seed=length)
    proj = rand_proj(d, seed=d)
    got = sla_reference(q, k, v, proj, topk=topk, bq=bq, bk=bk)
    want = naive_sla(q, k, v, proj, topk, bq, bk)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_block_map_matches_naive_and_keeps_kb_blocks():
    q, k, _ = rand_qkv(2, 333, 3, 16, seed=7, dtype=torch.float32)
    got = sla_block_map(q, k, 0.25)  # bq=128, bk=64: N_Q = 3, N_K = 6 (ragged tails), kb = 1
    assert got.shape == (2, 3, 3, 6) and got.dtype == torch.bool
    assert torch.equal(got, naive_block_map(q, k, 0.25, 128, 64))
    assert bool((got.sum(-1) == 1).all())
    lut = block_lut(q, k, 0.5)
    assert lut.shape == (2, 3, 3, 3)
    assert bool((lut[..., 1:] > lut[..., :-1]).all()), "LUT must be ascending within each query block"


def test_block_map_ignores_a_constant_shift_of_k():
    # Smoothing subtracts the token mean of k: adding one vector to every key cannot change the selection.
    q, k, _ = rand_qkv(1, 300, 2, 16, seed=3, dtype=torch.float64)
    shifted = k + 5.0 * torch.randn(1, 1, 2, 16, dtype=torch.float64)
    assert torch.equal(sla_block_map(q, k, 0.3), sla_block_map(q, shifted, 0.3))


def test_pool_averages_only_real_tokens_of_the_tail():
    x = torch.arange(1 * 5 * 1 * 2, dtype=torch.float32).reshape(1, 5, 1, 2)
    pooled = pool_blocks(x, 4)  # blocks: tokens 0..3 and token 4 alone
    torch.testing.assert_close(pooled[0, 0, 0], x[0, :4, 0].mean(0))
    torch.testing.assert_close(pooled[0, 0, 1], x[0, 4, 0])


def test_kb_zero_falls_back_to_dense():
    # L=100 -> N_K = 2, int(0.1 * 2) = 0 -> every key block kept: sparse branch == dense attention.
    q, k, v = rand_qkv(2, 100, 2, 16, seed=11, dtype=torch.float32)
    assert bool(sla_block_map(q, k, 0.1).all())
    got = sla_reference(q, k, v, None, topk=0.1)
    torch.testing.assert_close(got, dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    proj = rand_proj(16, seed=1)
    with_linear = sla_reference(q, k, v, proj, topk=0.1)
    torch.testing.assert_close(with_linear - got, proj(linear_branch(q, k, v)), rtol=1e-4, atol=1e-5)


def test_topk_selects_fewer_blocks_than_dense():
    q, k, v = rand_qkv(1, 512, 1, 16, seed=5, dtype=torch.float32)
    sparse = sla_reference(q, k, v, None, topk=0.25)
    assert sla_block_map(q, k, 0.25).sum(-1).unique().tolist() == [2]
    assert (sparse - dense_attention(q, k, v)).abs().max() > 1e-3  # really sparse, not silently dense


def test_chunking_does_not_change_the_result():
    q, k, v = rand_qkv(1, 300, 2, 16, seed=9, dtype=torch.float32)
    proj = rand_proj(16, seed=2)
    whole = sla_reference(q, k, v, proj, topk=0.5)
    chunked = sla_reference(q, k, v, proj, topk=0.5, max_chunk_elems=1)  # one query block at a time
    torch.testing.assert_close(whole, chunked, rtol=1e-6, atol=1e-6)


def test_public_api_dtype_backend_and_validation():
    q, k, v = (x.to(torch.bfloat16) for x in rand_qkv(1, 200, 2, 32, seed=4, dtype=torch.float32))
    proj = rand_proj(32, seed=3)
    out = sla_attention(q, k, v, proj, topk=0.3)  # CPU: auto -> reference
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # Same math, separate calls: a float32 difference in the last bit may flip the bf16 rounding of an
    # element, i.e. one bf16 ulp (2**-8 relative, ~4e-3).
    torch.testing.assert_close(out, sla_attention(q, k, v, proj, topk=0.3, backend="reference"), rtol=4e-3, atol=1e-4)
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="backend"):
        sla_attention(q, k, v, proj, backend="flash")
    with pytest.raises(ValueError, match="shape"):
        sla_attention(q, k[:, :100], v, proj)
    assert dense_attention(q, k, v).shape == q.shape
