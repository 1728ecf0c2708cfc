"""The Wan VAE decoder's Triton kernel (launched by ``vae_kernels``; imported only when first needed, so
TRITON_INTERPRET=1 set before that import runs it in the CPU interpreter)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_silu_kernel(X, Y, T, G, B, n_rows, tail_start, C, scale,  # type: ignore[no-untyped-def]
                    HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of C contiguous channels: y = silu(x / max(||x||, 1e-12) * scale * gamma (+ bias)), float32 inside.
    With HAS_TAIL, rows from ``tail_start`` on are also written to T (the causal cache: no second pass)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32) * scale
    y = x * inv[:, None] * g[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = (y / (1.0 + tl.exp(-y))).to(Y.dtype.element_ty)  # SiLU (tl.sigmoid: a jit helper the interpreter lacks)
    tl.store(Y + offs, y, mask=mask)
    if HAS_TAIL:
        trow = rows - tail_start
        in_tail = trow >= 0
        toffs = tl.where(in_tail, trow, 0).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(T + toffs, y, mask=mask & in_tail[:, None])
