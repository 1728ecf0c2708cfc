"""Whether Triton is importable and usable for a device (interpreter mode counts for CPU tensors)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable(device: torch.device) -> bool:
    """CUDA with Triton, or any device under TRITON_INTERPRET=1 (the CPU interpreter, used by tests)."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return interpret_mode() and device.type == "cpu"


def patch_interpreter_bf16() -> None:
    """Make bf16 under TRITON_INTERPRET=1 behave as on the GPU.

    The Triton interpreter (seen in 3.9) stores bf16 as raw uint16 and (1) its ``tl.dot`` multiplies those
    integers, (2) its float32 -> bf16 cast truncates where the GPU rounds to nearest even. We widen bf16 dot
    operands to float32 first (exact; the GPU dot accumulates in fp32) and round casts to nearest even.
    Only touches the interpreter; compiled GPU kernels are unaffected.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_turbobot_bf16_dot", False):
        return
    original = builder_cls.create_dot

    def widen(x: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if x.dtype.scalar == tl.bfloat16 or x.dtype == tl.bfloat16:
            data = (x.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = 0x7FC0
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls._turbobot_bf16_dot = True
