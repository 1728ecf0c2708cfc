"""SLA block selection on the GPU: Triton mean-pooling, float64 scores, Triton top-k into an ascending LUT.

Produces the same block map as ``reference.block_lut`` (pooled means in float32, scores in float64; only
exact ties between scores may be broken differently), plus the token mean of k, which the int8 variant
reuses for smoothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from generator.attention import _triton_env
from generator.attention.reference import blocks_to_keep, num_blocks

if _triton_env.interpret_mode():
    _triton_env.patch_interpreter_bf16()


@triton.jit
def _pool_kernel(
    X, OUT,
    stride_xb, stride_xl, stride_xh,
    H, L, N,
    BLOCK: tl.constexpr, D: tl.constexpr,
):
    # One program averages one block of BLOCK tokens of one (batch, head) (fp32; ragged tail: real tokens).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_l = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(base + offs_l[:, None].to(tl.int64) * stride_xl + offs_d[None, :],
                mask=offs_l[:, None] < L, other=0.0).to(tl.float32)
    count = tl.minimum(L - pid_n * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    tl.store(OUT + (pid_bh.to(tl.int64) * N + pid_n) * D + offs_d, mean)


@triton.jit
def _kth_largest(key, valid, K, BITS: tl.constexpr):
    # Largest t with #{valid & key >= t} >= K, built bit by bit from the top (key: unsigned, BITS wide).
    t = tl.zeros([], dtype=key.dtype)
    for i in range(BITS):
        cand = t | (tl.full([], 1, key.dtype) << (BITS - 1 - i))
        n_ge = tl.sum((valid & (key >= cand)).to(tl.int32), axis=0)
        t = tl.where(n_ge >= K, cand, t)
    return t


@triton.jit
def _select_kernel(S, LUT, NK, KB, NK_PAD: tl.constexpr):
    # Row-wise top-KB of float64 scores without sorting. The float's bits become an order-preserving
    # uint64 key; the KB-th largest key is found on its high 32 bits, and on the low 32 bits only among
    # high-bit ties (rare). Kept indices are written in ascending order (prefix sums give the slots).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NK_PAD)
    valid = offs < NK
    x = tl.load(S + row * NK + offs, mask=valid, other=0.0)
    bits = x.to(tl.uint64, bitcast=True)
    key = tl.where((bits >> 63) == 1, ~bits, bits | (1 << 63))  # larger float <=> larger unsigned key
    hi = (key >> 32).to(tl.uint32)
    lo = (key & 0xFFFFFFFF).to(tl.uint32)
    t_hi = _kth_largest(hi, valid, KB, 32)
    keep = valid & (hi > t_hi)
    tie = valid & (hi == t_hi)
    need = KB - tl.sum(keep.to(tl.int32), axis=0)
    if tl.sum(tie.to(tl.int32), axis=0) > need:
        t_lo = _kth_largest(lo, tie, need, 32)
        keep = keep | (tie & (lo > t_lo))
        tie = tie & (lo == t_lo)
        need = KB - tl.sum(keep.to(tl.int32), axis=0)
    # Exact ties left: the lowest indices win.
    keep = keep | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(LUT + row * KB + slot, offs, mask=keep)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, L, H, D] (last dim contiguous) -> block means [B, H, N, D] float32."""
    b, length, h, d = x.shape
    n = num_blocks(length, block)
    out = torch.empty(b, h, n, d, dtype=torch.float32, device=x.device)
    _pool_kernel[(n, b * h)](
        x, out, x.stride(0), x.stride(1), x.stride(2), h, length, n, BLOCK=block, D=d, num_warps=4
    )
    return out


def lut_from_pooled(
    pq: torch.Tensor, pk: torch.Tensor, length: int, bk: int, topk: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """From block means [B, H, N_Q, D] / [B, H, N_K, D] (fp32): (lut int32 [B, H, N_Q, kb], k mean [B, H, D])."""
    b, h, n_q, _ = pq.shape
    n_k = pk.shape[2]
    # Token mean of k from the block means, weighting the ragged last block by its real token count.
    counts = torch.full((n_k,), float(bk), dtype=torch.float32, device=pk.device)
    counts[-1] = float(length - (n_k - 1) * bk)
    k_mean = (pk * counts.view(1, 1, n_k, 1)).sum(dim=2) / length
    kb = blocks_to_keep(n_k, topk)
    if kb == 0:  # short sequence: dense fallback, every key block
        lut = torch.arange(n_k, dtype=torch.int32, device=pq.device).expand(b, h, n_q, n_k).contiguous()
        return lut, k_mean
    # float64 scores: immune to a global TF32 setting and to fp32 rounding near ties.
    scores = pq.double() @ (pk - k_mean.unsqueeze(2)).double().transpose(-1, -2)
    return topk_lut(scores, kb), k_mean


def topk_lut(scores: torch.Tensor, kb: int) -> torch.Tensor:
    """Indices of the kb largest float64 scores along the last dim, ascending, int32 (ties: lower index)."""
    scores = scores.contiguous()
    n_k = scores.shape[-1]
    lut = torch.empty(*scores.shape[:-1], kb, dtype=torch.int32, device=scores.device)
    nk_pad = max(32, triton.next_power_of_2(n_k))
    # Few warps: the bit steps are block-wide reductions, cheapest within one warp.
    _select_kernel[(scores.numel() // n_k,)](
        scores, lut, n_k, kb, NK_PAD=nk_pad, num_warps=max(1, nk_pad // 1024)
    )
    return lut


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, topk: float, bq: int, bk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (lut int32 [B, H, N_Q, kb] ascending, k token mean float32 [B, H, D])."""
    return lut_from_pooled(pool_blocks(q, bq), pool_blocks(k, bk), k.shape[1], bk, topk)
