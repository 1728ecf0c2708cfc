"""SLA block selection on the GPU: Triton top-k of float64 block scores into an ascending LUT.

The pooled means and scores come from ``sla_triton``'s pre-pass (pooling fused with the pass over k and
v); the block map equals ``reference.block_lut`` up to float32 rounding of the pooled means (pooled in
float32, scores in float64, exact ties broken towards the lower index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from generator.attention import _triton_env
from generator.attention.reference import BK, BQ

if _triton_env.interpret_mode():
    _triton_env.patch_interpreter_bf16()


@triton.jit
def _kth_largest(key, valid, K, BITS: tl.constexpr):  # type: ignore[no-untyped-def]
    # Largest t with #{valid & key >= t} >= K, built bit by bit from the top (key: unsigned, BITS wide).
    t = tl.zeros([], dtype=key.dtype)
    for i in range(BITS):
        cand = t | (tl.full([], 1, key.dtype) << (BITS - 1 - i))
        n_ge = tl.sum((valid & (key >= cand)).to(tl.int32), axis=0)
        t = tl.where(n_ge >= K, cand, t)
    return t


@triton.jit
def _select_kernel(S, LUT, NK, KB, NK_PAD: tl.constexpr):  # type: ignore[no-untyped-def]
    # Row-wise top-KB of float64 scores without sorting. The float's bits become an order-preserving
    # uint64 key; the KB-th largest key is found on its high 32 bits, and on the low 32 bits only among
    # high-bit ties (rare). Kept indices are written in ascending order (prefix sums give the slots).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NK_PAD)
    valid = offs < NK
    x = tl.load(S + row * NK + offs, mask=valid, other=0.0)
    bits = x.to(tl.uint64, bitcast=True)
    # larger float <=> larger unsigned key. XOR with all ones rather than ``~``: the interpreter's ``~``
    # builds -1 as uint64, which NumPy >= 2.4 refuses (OverflowError); the GPU emits the same instruction.
    key = tl.where((bits >> 63) == 1, bits ^ 0xFFFFFFFFFFFFFFFF, bits | (1 << 63))
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


def topk_lut(scores: torch.Tensor, kb: int, num_warps: int | None = None) -> torch.Tensor:
    """Indices of the kb largest float64 scores along the last dim, ascending, int32 (ties: lower index).
    ``num_warps`` only changes speed (default: one warp per 1024 scores)."""
    scores = scores.contiguous()
    n_k = scores.shape[-1]
    lut = torch.empty(*scores.shape[:-1], kb, dtype=torch.int32, device=scores.device)
    nk_pad = max(32, triton.next_power_of_2(n_k))
    # Few warps: the bit steps are block-wide reductions, cheapest within one warp.
    _select_kernel[(scores.numel() // n_k,)](
        scores, lut, n_k, kb, NK_PAD=nk_pad, num_warps=num_warps or max(1, nk_pad // 1024)
    )
    return lut


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, topk: float, bq: int = BQ, bk: int = BK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (lut int32 [B, H, N_Q, kb] ascending, k token mean float32 [B, H, D]), through the Triton
    pre-pass of ``sla_triton`` (pooling fused with the linear branch's pass over k)."""
    if (bq, bk) != (BQ, BK):
        raise ValueError(f"the Triton block map uses bq={BQ}, bk={BK}")
    from generator.attention import sla_triton  # imports this module: resolved at call time

    return sla_triton.select_blocks(q, k, topk)
