"""Frozen copy of the SLA kernels as committed in d00e945 (before the 2026-11-27 tuning), for same-run
before/after timings in ``bench/attention.py`` only. Not used by the engine; do not edit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from generator.attention.reference import BK, BQ, blocks_to_keep, num_blocks


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


LOG2E = 1.4426950408889634


@triton.jit
def _k_pass_kernel(
    K, V, PK, KV_PART, KSUM_PART,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    H, L, N_K, SPLIT_TILES, BH,
    BK: tl.constexpr, D: tl.constexpr, HAS_STATE: tl.constexpr,
):
    # One pass over key tiles [split*SPLIT_TILES, ...) of BK tokens: the tile means of k (block map) and,
    # with HAS_STATE, partial sums of phi(k)^T v and phi(k) (linear branch), phi = softmax over D.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    acc = tl.zeros([D, D], dtype=tl.float32)
    ksum = tl.zeros([D], dtype=tl.float32)
    t0 = pid_s * SPLIT_TILES
    for t in range(t0, tl.minimum(t0 + SPLIT_TILES, N_K)):
        offs_l = t * BK + tl.arange(0, BK)
        valid = offs_l < L
        rows = offs_l[:, None].to(tl.int64)
        k = tl.load(k_base + rows * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
        k = k.to(tl.float32)
        count = tl.minimum(L - t * BK, BK).to(tl.float32)
        tl.store(PK + (pid_bh.to(tl.int64) * N_K + t) * D + offs_d, tl.sum(k, axis=0) / count)
        if HAS_STATE:
            v = tl.load(v_base + rows * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            e = tl.exp(k - tl.max(k, axis=1)[:, None])
            phi = e / tl.sum(e, axis=1)[:, None]
            phi = tl.where(valid[:, None], phi, 0.0)
            ksum += tl.sum(phi, axis=0)
            acc += tl.dot(tl.trans(phi.to(v.dtype)), v)
    if HAS_STATE:
        part = pid_s.to(tl.int64) * BH + pid_bh
        tl.store(KV_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
        tl.store(KSUM_PART + part * D + offs_d, ksum)


@triton.jit
def _quant_k_kernel(
    K, KMEAN, K8, KSCALE,
    stride_kb, stride_kl, stride_kh,
    H, L, LPAD,
    BLOCK: tl.constexpr, D: tl.constexpr,
):
    # Smoothed k (k - token mean) to int8 with one scale per token; output [B*H, LPAD, D] and [B*H, LPAD].
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_l = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = offs_l < L
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    k = tl.load(k_base + offs_l[:, None].to(tl.int64) * stride_kl + offs_d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    mean = tl.load(KMEAN + pid_bh * D + offs_d)
    k = tl.where(valid[:, None], k - mean[None, :], 0.0)
    amax = tl.max(tl.abs(k), axis=1)
    scale = tl.maximum(amax, 1e-20) / 127.0
    kq = k / scale[:, None]
    kq = tl.where(kq >= 0, tl.floor(kq + 0.5), -tl.floor(-kq + 0.5))
    out_rows = pid_bh.to(tl.int64) * LPAD + offs_l
    tl.store(K8 + out_rows[:, None] * D + offs_d[None, :], kq.to(tl.int8))
    tl.store(KSCALE + out_rows, tl.where(valid, scale, 0.0))


@triton.jit
def _sla_fwd_kernel(
    Q, K, V, OUT, LUT,
    MKV, KSUM, BIAS,
    K8, KSCALE,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, N_Q, KB, LPAD,
    qk_scale,
    BLOCK_M: tl.constexpr, BK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, INT8_QK: tl.constexpr, LIN_TF32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    BLOCK_N: tl.constexpr = BK * PAIR  # PAIR consecutive LUT entries form one key tile
    offs_t = tl.arange(0, BLOCK_N)
    sub = offs_t // BK
    offs_in = offs_t % BK
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    if INT8_QK:
        # Per-token q scale, with the softmax scale (in log2 units) folded in.
        qf = q.to(tl.float32)
        q_amax = tl.maximum(tl.max(tl.abs(qf), axis=1), 1e-20)
        q_scale = q_amax / 127.0
        qq = qf / q_scale[:, None]
        qq = tl.where(qq >= 0, tl.floor(qq + 0.5), -tl.floor(-qq + 0.5))
        q8 = qq.to(tl.int8)
        q_scale = q_scale * qk_scale
        k8_base = K8 + pid_bh.to(tl.int64) * LPAD * D
        ks_base = KSCALE + pid_bh.to(tl.int64) * LPAD

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lut_base = LUT + (pid_bh.to(tl.int64) * N_Q + pid_m) * KB
    for j in range(0, KB, PAIR):
        # Scalar LUT loads: a vector gather of the indices per column measurably slowed the loop.
        kblk0 = tl.load(lut_base + j)
        if PAIR == 1:
            offs_n = kblk0 * BK + offs_t
            col_ok = offs_n < L
        else:
            kblk1 = tl.load(lut_base + tl.minimum(j + 1, KB - 1))  # odd KB: last tile's 2nd half masked
            offs_n = tl.where(sub == 0, kblk0, kblk1) * BK + offs_in
            col_ok = (offs_n < L) & (j + sub < KB)
        if INT8_QK:
            kt8 = tl.load(k8_base + offs_n[None, :].to(tl.int64) * D + offs_d[:, None])
            k_scale = tl.load(ks_base + offs_n)
            s_i = tl.dot(q8, kt8, out_dtype=tl.int32)
            s = s_i.to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        else:
            kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kl + offs_d[:, None],
                         mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, kt) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vl + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]

    if HAS_LINEAR:
        # Linear branch over all keys: phi(q) = softmax over features; KV and ksum come from the pre-pass.
        qf2 = q.to(tl.float32)
        e = tl.exp(qf2 - tl.max(qf2, axis=1)[:, None])
        phi_q = e / tl.sum(e, axis=1)[:, None]
        ksum = tl.load(KSUM + pid_bh.to(tl.int64) * D + offs_d)
        den = tl.sum(phi_q * ksum[None, :], axis=1) + 1e-5
        # proj_l(o_l) = phi(q) (KV W^T) / den + bias: M = KV W^T is folded per head on the host.
        mkv = tl.load(MKV + pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :])
        if LIN_TF32:
            # tf32 (10-bit mantissa) rather than bf16: proj_l can amplify o_l's rounding.
            proj = tl.dot(phi_q, mkv, input_precision="tf32") / den[:, None]
        else:
            proj = tl.dot(phi_q.to(tl.bfloat16), mkv.to(tl.bfloat16)) / den[:, None]
        if HAS_BIAS:
            proj += tl.load(BIAS + offs_d)[None, :]
        acc += proj

    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :],
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def k_pass(
    k: torch.Tensor, v: torch.Tensor, with_state: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over k (and v): block means of k [B, H, N_K, D] and, with_state, the linear branch's
    sum_L phi(k)^T v [B*H, D, D] and sum_L phi(k) [B*H, D] (all float32)."""
    b, length, h, d = k.shape
    bh = b * h
    n_k = triton.cdiv(length, BK)
    # Enough splits to fill the GPU (~4 programs per SM on 132 SMs); partials summed in torch (no atomics,
    # so the result is deterministic).
    splits = max(1, min(n_k, triton.cdiv(528, bh)))
    split_tiles = triton.cdiv(n_k, splits)
    splits = triton.cdiv(n_k, split_tiles)
    pk = torch.empty(b, h, n_k, d, dtype=torch.float32, device=k.device)
    if with_state:
        kv_part = torch.empty(splits, bh, d, d, dtype=torch.float32, device=k.device)
        ksum_part = torch.empty(splits, bh, d, dtype=torch.float32, device=k.device)
    else:
        kv_part = ksum_part = pk  # unused
    _k_pass_kernel[(splits, bh)](
        k, v, pk, kv_part, ksum_part,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, length, n_k, split_tiles, bh,
        BK=BK, D=d, HAS_STATE=with_state, num_warps=8 if d >= 128 else 4,
    )
    if not with_state:
        return pk, None, None
    return pk, kv_part.sum(dim=0), ksum_part.sum(dim=0)


def kv_state(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_L phi(k)^T v -> [B*H, D, D] and sum_L phi(k) -> [B*H, D], float32."""
    _, kv, ksum = k_pass(k, v, with_state=True)
    assert kv is not None and ksum is not None
    return kv, ksum


def quantize_k(k: torch.Tensor, k_mean: torch.Tensor, block: int = BK) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 smoothed k [B*H, LPAD, D] with per-token scales [B*H, LPAD]; LPAD = L rounded up to ``block``."""
    b, length, h, d = k.shape
    n = triton.cdiv(length, block)
    lpad = n * block
    k8 = torch.empty(b * h, lpad, d, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(b * h, lpad, dtype=torch.float32, device=k.device)
    _quant_k_kernel[(n, b * h)](
        k, k_mean.contiguous(), k8, k_scale,
        k.stride(0), k.stride(1), k.stride(2),
        h, length, lpad, BLOCK=block, D=d, num_warps=4,
    )
    return k8, k_scale, lpad


def sla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Linear | None,
    *,
    topk: float = 0.1,
    int8_qk: bool = False,
    lut: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    pair: int = 2,
    lin_tf32: bool = False,
) -> torch.Tensor:
    """SLA through the Triton kernels; [B, L, H, D] -> [B, L, H, D] in q.dtype.

    ``lut`` (int32 [B, H, N_Q, kb], e.g. from ``block_map.select_blocks``) may be given to reuse a block map;
    ``out`` (same shape and dtype as q, last dim contiguous) receives the result (the checks poison it).
    ``num_warps``/``num_stages``/``pair`` (key blocks per tile) tune the main kernel (defaults: fastest of an
    H100 sweep); ``lin_tf32`` computes the linear-branch epilogue dot in tf32 instead of bf16 (the H100 check
    showed no accuracy difference once proj_l is folded into the state).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, length, h, d = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"Triton SLA takes bf16/fp16 inputs, got {q.dtype}")
    has_linear = proj_l is not None
    has_bias = has_linear and proj_l.bias is not None
    need_map = lut is None or int8_qk
    if need_map or has_linear:
        pk, kv, ksum = k_pass(k, v, with_state=has_linear)
    k_mean = None
    if need_map:
        sel_lut, k_mean = lut_from_pooled(pool_blocks(q, BQ), pk, length, BK, topk)
        lut = sel_lut if lut is None else lut
    assert lut is not None
    lut = lut.to(torch.int32).contiguous()
    n_q, kb = lut.shape[2], lut.shape[3]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q in shape and dtype, with a contiguous last dim")
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)

    if has_linear:
        assert kv is not None and ksum is not None
        # Fold proj_l's weight into the state: o_l W^T = phi(q) (KV W^T) / den. float64: tiny, exact enough.
        w = proj_l.weight.detach().double()
        mkv = (kv.double() @ w.t()).float().contiguous()
        bias = proj_l.bias.detach().float().contiguous() if has_bias else dummy
    else:
        mkv = ksum = bias = dummy

    if int8_qk:
        assert k_mean is not None
        k8, k_scale, lpad = quantize_k(k, k_mean)
    else:
        k8, k_scale, lpad = dummy, dummy, 0

    args = (
        q, k, v, out, lut,
        mkv, ksum, bias,
        k8, k_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, length, n_q, kb, lpad,
        LOG2E / math.sqrt(d),
    )
    meta = dict(BLOCK_M=BQ, BK=BK, PAIR=pair, D=d, HAS_LINEAR=has_linear, HAS_BIAS=has_bias, INT8_QK=int8_qk,
                num_warps=num_warps, num_stages=num_stages)
    _sla_fwd_kernel[(n_q, b * h)](*args, LIN_TF32=lin_tf32, **meta)
    return out
