"""Pure-torch Sparse-Linear Attention (SLA): the oracle for the Triton kernels.

Semantics (docs/engine.md section 7, as the TurboDiffusion checkpoints were trained):
  * block map: k~ = k - mean over tokens of k; q mean-pooled over query blocks of ``bq`` tokens and k~ over
    key blocks of ``bk`` tokens (a partial last block averages only its real tokens); score = pooled_q @
    pooled_k^T (no scale, no softmax); each query block keeps its ``kb = min(N_K, int(topk * N_K))`` best
    key blocks; ``kb == 0`` (short sequences) falls back to all key blocks (dense sparse-branch).
  * sparse branch: exact softmax(q k^T / sqrt(D)) restricted to the selected key blocks (keys past L masked).
  * linear branch over ALL keys: phi = softmax over the feature dim,
    o_l = phi(q) (phi(k)^T v) / (phi(q) . sum_L phi(k) + 1e-5).
  * output = o_s + proj_l(o_l). ``proj_l=None`` means "no linear branch" (o = o_s), for tests only.

Everything is computed in float32 (or float64 when the inputs are float64). The sparse branch is computed
chunk by chunk over query blocks against all keys with non-selected blocks masked, so memory stays bounded
(about ``max_chunk_elems`` scores at a time) even at 40 heads x 75,600 tokens on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BQ = 128
BK = 64
LINEAR_EPS = 1e-5


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def blocks_to_keep(n_k: int, topk: float) -> int:
    """Key blocks kept per query block; 0 means 'fall back to dense' (every block kept)."""
    return min(n_k, int(topk * n_k))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` tokens of x [B, L, H, D] -> [B, H, N, D] (compute dtype).

    A partial last block is averaged over its real tokens only.
    """
    b, length, h, d = x.shape
    n = num_blocks(length, block)
    dt = _compute_dtype(x)
    full = length // block
    parts = []
    if full:
        parts.append(x[:, : full * block].to(dt).reshape(b, full, block, h, d).sum(dim=2))
    if full < n:  # ragged tail block
        parts.append(x[:, full * block :].to(dt).sum(dim=1, keepdim=True))
    sums = torch.cat(parts, dim=1)  # [B, N, H, D]
    counts = torch.full((n,), float(block), dtype=dt, device=x.device)
    counts[-1] = float(length - (n - 1) * block)
    return (sums / counts.view(1, n, 1, 1)).permute(0, 2, 1, 3)


def block_scores(q: torch.Tensor, k: torch.Tensor, bq: int = BQ, bk: int = BK) -> torch.Tensor:
    """pooled_q @ pooled(k - mean_L k)^T: [B, H, N_Q, N_K] float64 (pooled means in the compute dtype)."""
    length = k.shape[1]
    pq = pool_blocks(q, bq)
    pk = pool_blocks(k, bk)
    # Pooling is linear, so pooling k then subtracting the token mean equals pooling the smoothed k (the
    # ragged block included: it averages real tokens only). The token mean is the count-weighted mean of
    # the block means, which avoids another full pass over k.
    n_k = pk.shape[2]
    counts = torch.full((n_k,), float(bk), dtype=pk.dtype, device=k.device)
    counts[-1] = float(length - (n_k - 1) * bk)
    k_mean = (pk * counts.view(1, 1, n_k, 1)).sum(dim=2, keepdim=True) / length
    # float64 scores: immune to a global TF32 setting and to fp32 rounding near ties.
    return pq.double() @ (pk - k_mean).double().transpose(-1, -2)


def block_lut(q: torch.Tensor, k: torch.Tensor, topk: float, bq: int = BQ, bk: int = BK) -> torch.Tensor:
    """Indices of the selected key blocks, [B, H, N_Q, kb] int64, ascending within each query block."""
    scores = block_scores(q, k, bq, bk)
    n_k = scores.shape[-1]
    kb = blocks_to_keep(n_k, topk)
    if kb == 0:
        lut = torch.arange(n_k, device=q.device).expand(*scores.shape[:-1], n_k)
        return lut.contiguous()
    lut = torch.topk(scores, kb, dim=-1, sorted=False).indices
    return torch.sort(lut, dim=-1).values


def lut_to_mask(lut: torch.Tensor, n_k: int) -> torch.Tensor:
    mask = torch.zeros(*lut.shape[:-1], n_k, dtype=torch.bool, device=lut.device)
    mask.scatter_(-1, lut.long(), True)
    return mask


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, bq: int = BQ, bk: int = BK) -> torch.Tensor:
    """Boolean map [B, H, N_Q, N_K] of the key blocks each query block attends to in the sparse branch."""
    n_k = num_blocks(k.shape[1], bk)
    return lut_to_mask(block_lut(q, k, topk, bq, bk), n_k)


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o_l over all keys, [B, L, H, D] in the compute dtype."""
    dt = _compute_dtype(q)
    phi_k = torch.softmax(k.to(dt), dim=-1)
    kv = torch.einsum("blhd,blhe->bhde", phi_k, v.to(dt))  # [B, H, D, D]
    k_sum = phi_k.sum(dim=1)  # [B, H, D]
    del phi_k
    phi_q = torch.softmax(q.to(dt), dim=-1)
    num = torch.einsum("blhd,bhde->blhe", phi_q, kv)
    den = torch.einsum("blhd,bhd->blh", phi_q, k_sum).unsqueeze(-1) + LINEAR_EPS
    return num / den


def sparse_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    bq: int = BQ,
    bk: int = BK,
    max_chunk_elems: int = 1 << 28,
) -> torch.Tensor:
    """Block-sparse softmax attention over the key blocks in ``lut``; [B, L, H, D] in the compute dtype."""
    b, length, h, d = q.shape
    dt = _compute_dtype(q)
    n_q = num_blocks(length, bq)
    n_k = num_blocks(length, bk)
    scale = 1.0 / math.sqrt(d)
    kt = k.to(dt).permute(0, 2, 3, 1)  # [B, H, D, L]
    vt = v.to(dt).permute(0, 2, 1, 3)  # [B, H, L, D]
    mask_blocks = lut_to_mask(lut, n_k)  # [B, H, N_Q, N_K]
    out = torch.empty(b, length, h, d, dtype=dt, device=q.device)
    # Query blocks per chunk so that the [B, H, rows, L] score tensor stays under max_chunk_elems.
    per_block = b * h * bq * length
    chunk = max(1, max_chunk_elems // max(per_block, 1))
    for i0 in range(0, n_q, chunk):
        i1 = min(n_q, i0 + chunk)
        r0, r1 = i0 * bq, min(length, i1 * bq)
        qc = q[:, r0:r1].to(dt).permute(0, 2, 1, 3)  # [B, H, rows, D]
        s = (qc @ kt) * scale  # [B, H, rows, L]
        keep = mask_blocks[:, :, i0:i1]
        keep = keep.repeat_interleave(bq, dim=2)[:, :, : r1 - r0]
        keep = keep.repeat_interleave(bk, dim=3)[:, :, :, :length]
        s.masked_fill_(~keep, float("-inf"))
        del keep
        p = torch.softmax(s, dim=-1)
        del s
        out[:, r0:r1] = (p @ vt).permute(0, 2, 1, 3)
    return out


def sla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Linear | None,
    *,
    topk: float = 0.1,
    bq: int = BQ,
    bk: int = BK,
    lut: torch.Tensor | None = None,
    max_chunk_elems: int = 1 << 28,
) -> torch.Tensor:
    """Full SLA in float32/float64, [B, L, H, D] -> [B, L, H, D] in q.dtype.

    ``lut`` (from ``block_lut``) may be passed to score another implementation against the same block map.
    """
    if lut is None:
        lut = block_lut(q, k, topk, bq, bk)
    o = sparse_branch(q, k, v, lut, bq, bk, max_chunk_elems)
    if proj_l is not None:
        o_l = linear_branch(q, k, v)
        w = proj_l.weight.to(o.dtype)
        bias = None if proj_l.bias is None else proj_l.bias.to(o.dtype)
        o += F.linear(o_l, w, bias)
    return o.to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention through torch SDPA, [B, L, H, D] in and out."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous()
