"""Triton kernels for Sparse-Linear Attention (SLA) on [B, L, H, D] tensors.

Launches per call (the block map and the linear branch's state in three of them, no torch glue besides
one float64 matmul):
  1. ``_prep_kernel``: one read of q, k and v, split along the sequence: q block means (block map), k block
     means, the token sum of k, and with the linear branch the partial sums of phi(k)^T v [D, D] and
     phi(k) [D] (phi = softmax over D). Partials per split, no atomics, so results are deterministic.
  2. ``_finalize_kernel``: sums the partials: k token mean, centred k block means in float64 (block map),
     sum phi(k), and proj_l folded into the state, M = (sum phi(k)^T v) W^T, stored in bf16.
  3. scores = pooled q @ centred pooled k^T in float64 (torch), then ``block_map.topk_lut`` -> int32 LUT.
  4. ``_sla_fwd_kernel``: one program per (query rows, batch*head): online softmax over the selected key
     blocks. Scale folded into one FMA before exp2; keys past L masked only in the last tile (the LUT is
     ascending, so only its last entry can be the ragged block). Epilogue: o_s + (phi(q) / den) M + bias,
     the linear term accumulated by the same dot, written once in the output dtype.

``int8_qk=True`` is the SageAttention-style variant ("sagesla"): k is smoothed (token mean subtracted,
which leaves the softmax unchanged) and quantized to int8 with one scale per token in a pre-pass; q is
quantized per token inside the kernel; Q.K^T runs as an int8 dot with int32 accumulation; P.V stays bf16.
It uses the same block map (BQ=128, BK=64) as ``sla``, so its error against ``sla`` is quantization only.

Launch shapes of kernels 1, 3 (top-k warps) and 4 are picked per input shape on CUDA by timing a few
candidates on first use; ``TURBOBOT_SLA_AUTOTUNE=0`` pins the first candidate. The interpreter never tunes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl
import triton.testing

from generator.attention import _triton_env
from generator.attention.block_map import topk_lut
from generator.attention.reference import BK, BQ, blocks_to_keep

if _triton_env.interpret_mode():
    _triton_env.patch_interpreter_bf16()

_log = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
LINEAR_EPS = 1e-5
assert BQ == 2 * BK, "the prep kernel pools one query block from two key blocks"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _prep_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations as kernel types
    Q, K, V, PQ, PK, KV_PART, KSUM_PART, KTOK_PART,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    H, L, N_Q, N_K, SPLIT_TILES, BH,
    BK: tl.constexpr, D: tl.constexpr, HAS_STATE: tl.constexpr,
):
    # Program (split, b*h) reads key tiles [split*SPLIT_TILES, ...) of BK tokens of q, k, v once. SPLIT_TILES
    # is even, so a query block (two key tiles) never straddles two programs: its q sum is carried from the
    # even tile to the odd one (or the last), then stored as a mean.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    acc = tl.zeros([D, D], dtype=tl.float32)
    ksum = tl.zeros([D], dtype=tl.float32)
    ktok = tl.zeros([D], dtype=tl.float32)
    qsum = tl.zeros([D], dtype=tl.float32)
    t0 = pid_s * SPLIT_TILES
    for t in range(t0, tl.minimum(t0 + SPLIT_TILES, N_K)):
        offs_l = t * BK + tl.arange(0, BK)
        valid = offs_l < L
        rows = offs_l[:, None].to(tl.int64)
        q = tl.load(q_base + rows * stride_ql + offs_d[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_base + rows * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
        kf = k.to(tl.float32)
        ks = tl.sum(kf, axis=0)
        ktok += ks
        count = tl.minimum(L - t * BK, BK).to(tl.float32)
        tl.store(PK + (pid_bh.to(tl.int64) * N_K + t) * D + offs_d, ks / count)
        qsum += tl.sum(q.to(tl.float32), axis=0)
        q_end = ((t % 2) == 1) | (t == N_K - 1)
        count_q = tl.minimum(L - (t // 2) * 2 * BK, 2 * BK).to(tl.float32)
        tl.store(PQ + (pid_bh.to(tl.int64) * N_Q + t // 2) * D + offs_d, (qsum / count_q).to(tl.float64),
                 mask=(offs_d * 0 + q_end.to(tl.int32)) != 0)
        qsum = tl.where(q_end, 0.0, qsum)
        if HAS_STATE:
            v = tl.load(v_base + rows * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            e = tl.exp(kf - tl.max(kf, axis=1)[:, None])
            phi = e / tl.sum(e, axis=1)[:, None]
            phi = tl.where(valid[:, None], phi, 0.0)
            ksum += tl.sum(phi, axis=0)
            acc = tl.dot(tl.trans(phi.to(v.dtype)), v, acc)
    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(KTOK_PART + part * D + offs_d, ktok)
    if HAS_STATE:
        tl.store(KV_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
        tl.store(KSUM_PART + part * D + offs_d, ksum)


@triton.jit
def _finalize_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations as kernel types
    PK, PKC, KTOK_PART, KMEAN, KV_PART, KSUM_PART, KSUM, W, MKV,
    stride_wo, stride_wi,
    L, N_K, SPLITS, BH, BLK_PER_PROG,
    D: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, HAS_STATE: tl.constexpr,
):
    # Program (b*h, r): k token mean; centred k block means [r*BLK_PER_PROG, ...) in float64; with the
    # linear branch, rows [r*ROWS, ...) of M = (sum_s KV_PART) W^T (bf16), and (r == 0) sum phi(k).
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    bh64 = pid_bh.to(tl.int64)
    offs_d = tl.arange(0, D)
    ktok = tl.zeros([D], dtype=tl.float32)
    for s in range(SPLITS):
        ktok += tl.load(KTOK_PART + (s * BH + bh64) * D + offs_d)
    kmean = ktok / L
    if r == 0:
        tl.store(KMEAN + bh64 * D + offs_d, kmean)
    offs_c = tl.arange(0, CHUNK)
    j_end = tl.minimum((r + 1) * BLK_PER_PROG, N_K)
    for j0 in range(r * BLK_PER_PROG, j_end, CHUNK):
        rows = j0 + offs_c
        ok = (rows < j_end)[:, None]
        ptr = (bh64 * N_K + rows[:, None]) * D + offs_d[None, :]
        pk = tl.load(PK + ptr, mask=ok, other=0.0)
        tl.store(PKC + ptr, (pk - kmean[None, :]).to(tl.float64), mask=ok)
    if HAS_STATE:
        offs_r = r * ROWS + tl.arange(0, ROWS)
        kv = tl.zeros([ROWS, D], dtype=tl.float32)
        for s in range(SPLITS):
            kv += tl.load(KV_PART + ((s * BH + bh64) * D + offs_r[:, None]) * D + offs_d[None, :])
        w = tl.load(W + offs_d[:, None] * stride_wo + offs_d[None, :] * stride_wi).to(tl.float32)
        m = tl.dot(kv, tl.trans(w), input_precision="ieee")
        tl.store(MKV + (bh64 * D + offs_r[:, None]) * D + offs_d[None, :], m.to(tl.bfloat16))
        if r == 0:
            ks = tl.zeros([D], dtype=tl.float32)
            for s in range(SPLITS):
                ks += tl.load(KSUM_PART + (s * BH + bh64) * D + offs_d)
            tl.store(KSUM + bh64 * D + offs_d, ks)


@triton.jit
def _quant_k_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations as kernel types
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
def _attend(  # type: ignore[no-untyped-def]  # Triton reads annotations as kernel types
    acc, m_i, l_i, q, q8, row_scale,
    k_base, v_base, k8_base, ks_base, stride_kl, stride_vl, lut_base, j, KB, L,
    BK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr, INT8_QK: tl.constexpr, MASKED: tl.constexpr,
):
    # One key tile of PAIR selected blocks. Scores stay unscaled; row_scale (softmax scale in log2 units,
    # times the q scale for int8) is applied by the FMA inside exp2. MASKED only for the LUT's last tile.
    BLOCK_N: tl.constexpr = BK * PAIR
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kblk0 = tl.load(lut_base + j)
    if PAIR == 1:
        offs_n = kblk0 * BK + offs_t
        col_ok = offs_n < L
    else:
        sub = offs_t // BK
        if MASKED:
            kblk1 = tl.load(lut_base + tl.minimum(j + 1, KB - 1))  # odd KB: the tile's 2nd half is masked
        else:
            kblk1 = tl.load(lut_base + j + 1)
        offs_n = tl.where(sub == 0, kblk0, kblk1) * BK + offs_t % BK
        col_ok = (offs_n < L) & (j + sub < KB)
    rows_n = offs_n.to(tl.int64)
    if INT8_QK:
        kt8 = tl.load(k8_base + rows_n[None, :] * D + offs_d[:, None])  # padded to LPAD: in bounds
        k_scale = tl.load(ks_base + offs_n)
        s = tl.dot(q8, kt8, out_dtype=tl.int32).to(tl.float32) * k_scale[None, :]
    else:
        if MASKED:
            kt = tl.load(k_base + rows_n[None, :] * stride_kl + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        else:
            kt = tl.load(k_base + rows_n[None, :] * stride_kl + offs_d[:, None])
        s = tl.dot(q, kt)
    if MASKED:
        s = tl.where(col_ok[None, :], s, float("-inf"))
        v = tl.load(v_base + rows_n[:, None] * stride_vl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_base + rows_n[:, None] * stride_vl + offs_d[None, :])
    if INT8_QK:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
        p = tl.exp2(s * row_scale[:, None] - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
        p = tl.exp2(s * row_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _sla_fwd_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations as kernel types
    Q, K, V, OUT, LUT,
    MKV, KSUM, BIAS,
    K8, KSCALE,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, N_Q, KB, LPAD,
    qk_scale,
    BLOCK_M: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, INT8_QK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        row_scale = q_scale * qk_scale
        k8_base = K8 + pid_bh.to(tl.int64) * LPAD * D
        ks_base = KSCALE + pid_bh.to(tl.int64) * LPAD
    else:
        q8 = q
        row_scale = qk_scale
        k8_base = K8
        ks_base = KSCALE

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lut_base = LUT + (pid_bh.to(tl.int64) * N_Q + (pid_m * BLOCK_M) // BQ) * KB
    # Every LUT entry before the last tile is a full key block (ascending LUT): no masks there.
    kb_main = ((KB - 1) // PAIR) * PAIR
    for j in range(0, kb_main, PAIR):
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, q8, row_scale, k_base, v_base, k8_base, ks_base, stride_kl, stride_vl,
            lut_base, j, KB, L, BK=BK, PAIR=PAIR, D=D, INT8_QK=INT8_QK, MASKED=False,
        )
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, q8, row_scale, k_base, v_base, k8_base, ks_base, stride_kl, stride_vl,
        lut_base, kb_main, KB, L, BK=BK, PAIR=PAIR, D=D, INT8_QK=INT8_QK, MASKED=True,
    )
    acc = acc / l_i[:, None]

    if HAS_LINEAR:
        # Linear branch over all keys: phi(q) = softmax over features; sum phi(k) and M = KV W^T come
        # from the pre-pass. (phi / den) M is accumulated into acc by the dot itself (bf16 operands).
        qf2 = q.to(tl.float32)
        e = tl.exp(qf2 - tl.max(qf2, axis=1)[:, None])
        phi_q = e / tl.sum(e, axis=1)[:, None]
        ksum = tl.load(KSUM + pid_bh.to(tl.int64) * D + offs_d)
        den = tl.sum(phi_q * ksum[None, :], axis=1) + 1e-5
        mkv = tl.load(MKV + pid_bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :])
        acc = tl.dot((phi_q / den[:, None]).to(tl.bfloat16), mkv, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d).to(tl.float32)[None, :]

    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :],
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Launch configurations and the per-shape tuner
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MainConfig:
    """Tile shape of the attention kernel: BLOCK_M query rows (64 or 128), PAIR key blocks per tile."""

    block_m: int = 128
    pair: int = 2
    num_warps: int = 8
    num_stages: int = 3

    @property
    def name(self) -> str:
        return f"m{self.block_m}p{self.pair}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class PrepConfig:
    """Pre-pass launch: warps per program and programs per SM (132 SMs assumed for the split count)."""

    num_warps: int = 8
    per_sm: int = 4

    @property
    def name(self) -> str:
        return f"w{self.num_warps}x{self.per_sm}"


@dataclass(frozen=True)
class TopkConfig:
    """Warps per row of the top-k selection (exact either way; only speed differs)."""

    num_warps: int = 1

    @property
    def name(self) -> str:
        return f"w{self.num_warps}"


# First entries are the defaults. H100 2026-11-27 (bench/RESULTS.md): m128p2w8s2 was fastest for sla at every
# shape, m64p1w4s3 for sagesla at 12 heads; m64p2w4s3 never won (dropped).
MAIN_CONFIGS: tuple[MainConfig, ...] = (
    MainConfig(128, 2, 8, 2),
    MainConfig(128, 2, 8, 3),
    MainConfig(64, 1, 4, 3),
    MainConfig(64, 1, 4, 4),
)
PREP_CONFIGS: tuple[PrepConfig, ...] = (PrepConfig(8, 4), PrepConfig(8, 8), PrepConfig(4, 8))

_C = TypeVar("_C", MainConfig, PrepConfig, TopkConfig)
_TUNED: dict[tuple, Any] = {}
TUNING_LOG: dict[str, dict[str, float]] = {}  # key -> {config name: median ms}, for the benchmarks


def autotune_enabled() -> bool:
    return (
        not _triton_env.interpret_mode()
        and torch.cuda.is_available()
        and os.environ.get("TURBOBOT_SLA_AUTOTUNE", "1") != "0"
    )


def _pick(kind: str, key: tuple, candidates: tuple[_C, ...], launch: Callable[[_C], object]) -> _C:
    """The fastest candidate for ``key`` (timed once per process with CUDA events), else the first."""
    full_key = (kind, *key)
    if full_key in _TUNED:
        return _TUNED[full_key]
    choice = candidates[0]
    if autotune_enabled() and len(candidates) > 1:
        times: dict[str, float] = {}
        best = float("inf")
        for cfg in candidates:
            try:
                ms = float(triton.testing.do_bench(functools.partial(launch, cfg), warmup=5, rep=25,
                                                   return_mode="median"))
            except Exception as exc:  # e.g. out of shared memory on a smaller GPU: skip that shape
                times[cfg.name] = float("nan")
                _log.warning("sla autotune: %s %s failed: %s: %.120s", kind, cfg.name, type(exc).__name__, exc)
                continue
            times[cfg.name] = ms
            if ms < best:
                best, choice = ms, cfg
        TUNING_LOG[f"{kind}:{key}"] = times
    _TUNED[full_key] = choice
    return choice


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class Prep:
    """Results of the pre-pass: float64 pooled q [B, H, N_Q, D] and centred pooled k [B, H, N_K, D] (block
    map), k token mean [B*H, D] fp32, and with the linear branch sum phi(k) [B*H, D] fp32 and
    M = KV W^T [B*H, D, D] bf16 (or the raw partials, when no weight was given)."""

    pq: torch.Tensor
    pkc: torch.Tensor
    k_mean: torch.Tensor
    ksum: torch.Tensor | None = None
    mkv: torch.Tensor | None = None
    kv_parts: torch.Tensor | None = None
    ksum_parts: torch.Tensor | None = None


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    with_state: bool,
    config: PrepConfig | None = None,
) -> Prep:
    """Kernels 1 and 2: block means for the block map, k token mean, and (``with_state``) the linear branch's
    state with ``weight`` (proj_l's [D, D]) folded in; ``weight=None`` keeps the raw partial sums instead."""
    b, length, h, d = q.shape
    bh = b * h
    n_q = triton.cdiv(length, BQ)
    n_k = triton.cdiv(length, BK)
    dev = q.device
    pq = torch.empty(b, h, n_q, d, dtype=torch.float64, device=dev)
    pk = torch.empty(bh, n_k, d, dtype=torch.float32, device=dev)

    def launch(cfg: PrepConfig) -> tuple[torch.Tensor, ...]:
        splits = max(1, min(n_q, triton.cdiv(132 * cfg.per_sm, bh)))
        split_tiles = 2 * triton.cdiv(n_q, splits)  # even: whole query blocks per program
        splits = triton.cdiv(n_k, split_tiles)
        ktok = torch.empty(splits, bh, d, dtype=torch.float32, device=dev)
        if with_state:
            kv_p = torch.empty(splits, bh, d, d, dtype=torch.float32, device=dev)
            ks_p = torch.empty(splits, bh, d, dtype=torch.float32, device=dev)
        else:
            kv_p = ks_p = ktok  # unused
        _prep_kernel[(splits, bh)](
            q, k, v, pq, pk, kv_p, ks_p, ktok,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            h, length, n_q, n_k, split_tiles, bh,
            BK=BK, D=d, HAS_STATE=with_state, num_warps=cfg.num_warps,
        )
        return ktok, kv_p, ks_p, splits

    if config is None:
        config = _pick("prep", (b, length, h, d, with_state, str(q.dtype)), PREP_CONFIGS, launch)
    ktok, kv_p, ks_p, splits = launch(config)

    pkc = torch.empty(b, h, n_k, d, dtype=torch.float64, device=dev)
    k_mean = torch.empty(bh, d, dtype=torch.float32, device=dev)
    fold = with_state and weight is not None
    rows = 16 if d >= 16 else d
    n_prog = d // rows
    if fold:
        assert weight is not None
        ksum = torch.empty(bh, d, dtype=torch.float32, device=dev)
        mkv = torch.empty(bh, d, d, dtype=torch.bfloat16, device=dev)
        w = weight.detach()
        w_strides = (w.stride(0), w.stride(1))
    else:
        ksum = mkv = w = k_mean  # unused
        w_strides = (0, 0)
    _finalize_kernel[(bh, n_prog)](
        pk, pkc, ktok, k_mean, kv_p, ks_p, ksum, w, mkv,
        *w_strides,
        length, n_k, splits, bh, triton.cdiv(n_k, n_prog),
        D=d, ROWS=rows, CHUNK=32, HAS_STATE=fold, num_warps=4,
    )
    prep = Prep(pq=pq, pkc=pkc, k_mean=k_mean)
    if fold:
        prep.ksum, prep.mkv = ksum, mkv
    elif with_state:
        prep.kv_parts, prep.ksum_parts = kv_p, ks_p
    return prep


def lut_from_prep(prep: Prep, topk: float) -> torch.Tensor:
    """Kernel 3: block scores (float64, as the reference) and top-k -> int32 [B, H, N_Q, kb], ascending."""
    b, h, n_q, _ = prep.pq.shape
    n_k = prep.pkc.shape[2]
    kb = blocks_to_keep(n_k, topk)
    if kb == 0:  # short sequence: dense fallback, every key block
        return torch.arange(n_k, dtype=torch.int32, device=prep.pq.device).expand(b, h, n_q, n_k).contiguous()
    scores = torch.matmul(prep.pq, prep.pkc.transpose(-1, -2))
    base = max(1, triton.next_power_of_2(n_k) // 1024)
    candidates = tuple(TopkConfig(w) for w in dict.fromkeys((base, min(8, 2 * base), min(8, 4 * base))))
    cfg = _pick("topk", (b * h * n_q, n_k, kb), candidates, lambda c: topk_lut(scores, kb, c.num_warps))
    return topk_lut(scores, kb, cfg.num_warps)


def kv_state(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_L phi(k)^T v -> [B*H, D, D] and sum_L phi(k) -> [B*H, D], float32 (tests and diagnostics)."""
    prep = prepare(k, k, v, None, with_state=True)
    assert prep.kv_parts is not None and prep.ksum_parts is not None
    return prep.kv_parts.sum(dim=0), prep.ksum_parts.sum(dim=0)


def quantize_k(k: torch.Tensor, k_mean: torch.Tensor, block: int = BK) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 smoothed k [B*H, LPAD, D] with per-token scales [B*H, LPAD]; LPAD = L rounded up to ``block``.
    ``k_mean``: [B, H, D] or [B*H, D] float32."""
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


# Outside torch.compile graphs: launches, the per-shape tuner and its cache are plain Python, so a regionally
# compiled DiT block compiles around the attention (one graph before it, one after).
@torch.compiler.disable
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
    config: MainConfig | None = None,
    prep_config: PrepConfig | None = None,
) -> torch.Tensor:
    """SLA through the Triton kernels; [B, L, H, D] -> [B, L, H, D] in q.dtype.

    ``lut`` (int32 [B, H, N_Q, kb], ascending in each row, e.g. from ``block_map.select_blocks``) may be
    given to reuse a block map; ``out`` (same shape and dtype as q, last dim contiguous) receives the result
    (the checks poison it). ``config``/``prep_config`` pin the launch shapes (default: tuned per shape on
    CUDA, first candidate elsewhere).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, length, h, d = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"Triton SLA takes bf16/fp16 inputs, got {q.dtype}")
    has_bias = proj_l is not None and proj_l.bias is not None
    need_map = lut is None or int8_qk
    prep = None
    if need_map or proj_l is not None:
        weight = proj_l.weight if proj_l is not None else None
        prep = prepare(q, k, v, weight, with_state=proj_l is not None, config=prep_config)
    if lut is None:
        assert prep is not None
        lut = lut_from_prep(prep, topk)
    lut = lut.to(torch.int32).contiguous()
    n_q, kb = lut.shape[2], lut.shape[3]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q in shape and dtype, with a contiguous last dim")
    dummy = lut  # any tensor: pointer arguments a constexpr flag leaves unused

    has_linear = proj_l is not None
    if proj_l is not None:
        assert prep is not None and prep.mkv is not None and prep.ksum is not None
        mkv, ksum = prep.mkv, prep.ksum
        bias = proj_l.bias.detach() if proj_l.bias is not None else dummy
    else:
        mkv = ksum = bias = dummy

    if int8_qk:
        assert prep is not None
        k8, k_scale, lpad = quantize_k(k, prep.k_mean)
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

    def launch(cfg: MainConfig) -> None:
        _sla_fwd_kernel[(triton.cdiv(length, cfg.block_m), b * h)](
            *args, BLOCK_M=cfg.block_m, BQ=BQ, BK=BK, PAIR=cfg.pair, D=d,
            HAS_LINEAR=has_linear, HAS_BIAS=has_bias, INT8_QK=int8_qk,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        key = (b, length, h, d, kb, int8_qk, has_linear, str(q.dtype))
        config = _pick("main", key, MAIN_CONFIGS, launch)
    launch(config)
    return out


def select_blocks(q: torch.Tensor, k: torch.Tensor, topk: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block map through the Triton pre-pass: (lut int32 [B, H, N_Q, kb] ascending, k token mean [B, H, D])."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    prep = prepare(q, k, k, None, with_state=False)
    b, _, h, d = q.shape
    return lut_from_prep(prep, topk), prep.k_mean.view(b, h, d)
