"""The Wan VAE decoder's Triton kernel (launched by ``vae_kernels``; imported only when first needed, so
TRITON_INTERPRET=1 set before that import runs it in the CPU interpreter)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_silu_kernel(X, Y, G, B, n_rows, C, scale, HAS_BIAS: tl.constexpr,  # type: ignore[no-untyped-def]
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of C contiguous channels: y = silu(x / max(||x||, 1e-12) * scale * gamma (+ bias)), float32 inside."""
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
    y = y / (1.0 + tl.exp(-y))  # SiLU (tl.sigmoid is a jit helper the interpreter cannot call)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
