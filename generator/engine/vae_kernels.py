"""Launching the Wan VAE decoder's Triton kernel (``vae_triton``): RMS norm over channels + SiLU.

Activations are channels-last ([B, T, H, W, C] in memory), so each pixel's channels are one contiguous row:
the kernel normalises rows in float32 (``x / max(||x||, 1e-12) * sqrt(C) * gamma (+ bias)``, diffusers'
``WanRMS_norm``), applies SiLU and rounds once to the output dtype, writing straight into the caller's buffer
(the causal conv's input, history frames in front). Runs on CUDA, and on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Any

import torch

from generator.attention import _triton_env

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_kernel: Any = None


# The CPU interpreter runs the kernel only when asked (tests): it is far slower than torch on the CPU.
INTERPRET_ON_CPU = False


def available(x: torch.Tensor) -> bool:
    if x.device.type != "cuda" and not INTERPRET_ON_CPU:
        return False
    return _triton_env.triton_runnable(x.device) and x.dtype in _DTYPES


def _rows_view_ok(t: torch.Tensor) -> bool:
    """Batch 1 and channels-last dense: pixel p's channels at p * C ... p * C + C - 1."""
    return t.shape[0] == 1 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _build() -> Any:
    from generator.engine import vae_triton  # imports Triton: only when a kernel is first needed

    return vae_triton.rms_silu_kernel


def rms_silu_into(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                  out: torch.Tensor, tail: torch.Tensor | None = None) -> None:
    """``out[...] = silu(rms_norm(x))`` for x, out of shape [1, C, T, H, W]; ``out`` must be channels-last
    dense (a time slice of a channels-last buffer is); x is made so if it is not. ``tail`` (channels-last,
    [1, C, k, H, W]) also receives the last k frames of the result."""
    global _kernel
    import triton

    if not _rows_view_ok(out) or out.shape != x.shape:
        raise ValueError("rms_silu_into needs batch 1 and a channels-last output of x's shape")
    if tail is not None and (not _rows_view_ok(tail) or tail.shape[:2] != x.shape[:2] or tail.shape[3:] != x.shape[3:]
                             or tail.shape[2] > x.shape[2]):
        raise ValueError("rms_silu_into: the tail must be channels-last, batch 1, at most x's frames")
    if not _rows_view_ok(x):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if _kernel is None:
        if _triton_env.interpret_mode():
            _triton_env.patch_interpreter_bf16()
        _kernel = _build()
    c = x.shape[1]
    n_rows = x.numel() // c
    tail_start = n_rows - (tail.numel() // c if tail is not None else 0)
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 8192 // block_c))
    grid = (triton.cdiv(n_rows, block_r),)
    _kernel[grid](x, out, tail if tail is not None else out, gamma.contiguous(),
                  bias.contiguous() if bias is not None else gamma, n_rows, tail_start, c, float(scale),
                  HAS_BIAS=bias is not None, HAS_TAIL=tail is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                  num_warps=4 if block_c <= 256 else 8)
