"""The VAE decoder's fast forwards (generator/engine/vae_fast.py: one fused norm + SiLU pass written straight
into the causal conv's input, native spatial padding, bf16 upsampling) decode what diffusers' stock blocks
decode: in float32 to float32 rounding, on the engine's tiny VAE and a real-width Wan2.1 decoder, frame by frame
and in chunks; and the Triton norm kernel (run by the CPU interpreter) matches the torch formula."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan

from generator.engine import vae_chunked, vae_fast
from generator.engine.tiny import tiny_vae

# float32 on both sides: the same operations up to association ((x/n)*s*g vs (x/n)*(s*g), native vs explicit
# zero padding, one fewer cast), each ~1 ulp (6e-8 relative) per op; through ~20 convs of <= 96x27 taps the
# accumulated difference stays far under 1e-5 of values bounded by 1 after the clamp.
TOL = {"rtol": 0.0, "atol": 1e-5}


def decode(vae: AutoencoderKLWan, z: torch.Tensor, chunk: int, fast: bool) -> torch.Tensor:
    opts = vae_chunked.DecodeOptions(fast_blocks=fast, fast_blocks_cpu=fast)
    parts = []
    for part in vae_chunked.iter_decoded(vae, z, chunk=chunk, options=opts):
        assert ("forward" in vars(vae.decoder)) == fast  # the fast forwards are bound during the decode
        parts.append(part)
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_tiny_vae_fast_equals_stock(chunk: int) -> None:
    vae = tiny_vae()
    z = torch.randn(1, 16, 7, 3, 4, generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(decode(vae, z, chunk, True), decode(vae, z, chunk, False), **TOL)


@pytest.fixture(scope="module")
def real() -> tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=96, z_dim=16).float().eval().requires_grad_(False)  # Wan2.1 widths
    z = torch.randn(1, 16, 5, 6, 6, generator=torch.Generator().manual_seed(22))
    ref = decode(vae, z, 1, False)
    assert (ref.abs() < 1).float().mean() > 0.9  # not saturated by the clamp: the comparison means something
    return vae, z, ref


@pytest.mark.parametrize("chunk", [1, 4])
def test_real_width_fast_equals_stock(real: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor], chunk: int) -> None:
    vae, z, ref = real
    torch.testing.assert_close(decode(vae, z, chunk, True), ref, **TOL)


def test_forwards_are_restored() -> None:
    vae = tiny_vae()
    with vae_fast.fast_forwards(vae.decoder):
        assert "forward" in vars(vae.decoder)
    assert not [m for m in vae.decoder.modules() if "forward" in vars(m)]


_KERNEL_CHECK = """
import sys
import torch
import torch.nn.functional as F
from generator.engine import vae_fast, vae_kernels

vae_kernels.INTERPRET_ON_CPU = True
dtype, atol = getattr(torch, sys.argv[1]), float(sys.argv[2])
g = torch.Generator().manual_seed(5)
c = 24
norm = vae_fast.WanRMS_norm(c, images=False)
with torch.no_grad():
    norm.gamma.copy_(torch.rand(norm.gamma.shape, generator=g) + 0.5)
x = (torch.randn(1, c, 3, 5, 7, generator=g) * 3).to(dtype)
history = torch.randn(1, c, 2, 5, 7, generator=g).to(dtype)
assert vae_kernels.available(x)
out, tail = vae_fast.norm_act_with_history(norm, x, history, 2, keep=2)
assert out.is_contiguous(memory_format=torch.channels_last_3d)
assert tail is not None and torch.equal(tail, out[:, :, -2:])  # the cache, written by the same pass
expect = F.silu(F.normalize(x.float(), dim=1) * norm.scale * norm.gamma.float().view(1, c, 1, 1, 1))
torch.testing.assert_close(out[:, :, 2:].float(), expect, rtol=0.0, atol=atol)
assert torch.equal(out[:, :, :2], history)  # a copy, bit for bit
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-5), ("bfloat16", 1.6e-2)])
def test_norm_kernel_matches_torch(dtype: str, atol: float) -> None:
    """The kernel in the Triton interpreter (its own process: TRITON_INTERPRET must be set before Triton is
    imported) vs the torch formula: channels not a power of two, a ragged last block of rows, history frames
    in front copied untouched, the cache frames written by the same pass. bf16: both round one float32 value once, so they differ by at most one bf16 ulp
    of values up to ~|4| (2^-6 = 1.6e-2) where the reductions' order differs."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK, dtype, str(atol)], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
