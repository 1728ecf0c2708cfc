"""Self-attention for the turbo engine: Sparse-Linear Attention (SLA) and dense SDPA.

Public API (layout everywhere: [B, L, H, D], q/k already RMS-normed and RoPE'd):

* ``sla_attention(q, k, v, proj_l, *, topk=0.1, backend="auto")`` -> [B, L, H, D] in q.dtype.
  backends: "reference" (pure torch, CPU or GPU, float32 inside, memory-bounded), "triton" (our kernels,
  bf16/fp16 in and out), "sagesla" (same, with an int8 Q.K^T sparse branch; rel. error vs reference
  <= 3e-2, measured 3e-3 on unit-variance inputs and 1.7e-2 with a sharper softmax), "auto" (triton for
  bf16/fp16 CUDA tensors, else reference).
  ``proj_l=None`` means "no linear branch" (o = o_s); the engine always passes the block's proj_l.
  kb = min(N_K, int(topk * N_K)) == 0 (sequences under 10 key blocks at topk 0.1) keeps every key block
  (the sparse branch becomes dense attention; the linear branch and proj_l still apply).
* ``dense_attention(q, k, v)`` -> SDPA, same layout.
* ``sla_block_map(q, k, topk, bq=128, bk=64)`` -> bool [B, H, N_Q, N_K] of selected key blocks.

See ``reference.py`` for the exact semantics (docs/engine.md section 7). Imports torch (and Triton when
present) only: nothing of the rest of the project.
"""

from __future__ import annotations

import torch

from generator.attention.reference import (
    BK,
    BQ,
    block_lut,
    blocks_to_keep,
    dense_attention,
    num_blocks,
    sla_block_map,
    sla_reference,
)

BACKENDS = ("auto", "reference", "triton", "sagesla")

__all__ = [
    "BACKENDS",
    "BK",
    "BQ",
    "block_lut",
    "blocks_to_keep",
    "dense_attention",
    "num_blocks",
    "sla_attention",
    "sla_block_map",
    "sla_reference",
    "triton_supported",
]


def triton_supported(q: torch.Tensor) -> bool:
    """True when our Triton kernels can run on q: CUDA (or the CPU interpreter), Triton importable,
    bf16/fp16, head dim 16/32/64/128."""
    from generator.attention import _triton_env

    return (
        _triton_env.triton_runnable(q.device)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (16, 32, 64, 128)
    )


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l: torch.nn.Linear | None,
    *,
    topk: float = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse-Linear Attention, [B, L, H, D] -> [B, L, H, D] in q.dtype (see module docstring)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, L, H, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown SLA backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_supported(q) else "reference"
    if backend == "reference":
        return sla_reference(q, k, v, proj_l, topk=topk)
    if not triton_supported(q):
        raise RuntimeError(
            f"SLA backend {backend!r} needs a CUDA tensor, an importable Triton and head dim in 16/32/64/128"
        )
    from generator.attention import sla_triton

    return sla_triton.sla_forward(q, k, v, proj_l, topk=topk, int8_qk=(backend == "sagesla"))
