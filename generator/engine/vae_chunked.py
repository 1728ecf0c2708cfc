"""Chunked causal decode of the Wan VAE: latent frame 0 alone, then up to ``k`` latent frames per decoder pass.

diffusers' ``AutoencoderKLWan._decode`` runs the decoder once per latent frame, carrying each causal conv's last
two input frames in ``feat_cache``. Every layer of the Wan decoder is causal in time and keeps its cache as "the
last ``CACHE_T`` = 2 frames it has seen", so feeding it several latent frames in one pass gives the same result as
feeding them one by one, with fewer, larger kernels (measured on an H200 at 480p x 81 frames: 1.17x faster than
diffusers' decode with channels-last layout; the convolutions themselves, not the loop, bound the rest):

* causal convs concatenate the cache in front of the chunk; with a chunk of >= 2 frames the new cache is simply
  its last two frames (the stock code pads a 1-frame cache only when the chunk has a single frame);
* the temporal upsampler (``upsample3d``) skips its time conv for the very first chunk and marks the cache
  "Rep"; the next chunk runs the time conv with zero history and interleaves the two channel halves frame by
  frame (``stack`` on the time axis), which is the same for 1 or k frames; frame 0 must therefore stay alone
  (it is the only chunk that is not doubled in time), exactly as ``first_chunk`` expects;
* the mid-block attention folds time into the batch, so it is per frame whatever the chunk size.

The chunk size adapts to free GPU memory; a pass that still runs out of memory is retried with half the
frames from a snapshot of the cache list (entries are replaced, never changed in place, so a shallow copy is
an exact snapshot). A single-frame pass that runs out of memory propagates, and the engine falls back to the
tiled decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from torch import nn

from generator.engine import vae_fast


@dataclass(frozen=True)
class DecodeOptions:
    """How the untiled decode runs (output is the same for every setting, up to kernel rounding)."""

    # latent frames per pass after the first. 3 was the best whole job on an H200 (bench/RESULTS.md): smaller
    # passes stream into the mp4 encoder sooner, and the 1.3B 480p job's peak stays under 24 GB (5: 27 GB)
    max_chunk: int = 3
    adaptive: bool = True  # shrink the chunk to what free GPU memory holds
    channels_last: bool = True  # NDHWC activations/weights during the decode (cuDNN's fast conv layout)
    memory_fraction: float = 0.8  # of free GPU memory that one pass may plan to use
    # Off CUDA one latent frame per pass: bigger passes were no faster on the CPU (real widths, 8x8 latent:
    # 3.5 s per frame vs 4.8 s at 3 per pass), and per-frame keeps CPU output bit-identical to diffusers'.
    cpu_max_chunk: int = 1
    # vae_fast's block forwards (fused norm + SiLU into the conv input, no float32 copies). Off the GPU the
    # stock blocks run unless asked, so CPU output stays bit-identical to diffusers'.
    fast_blocks: bool = True
    fast_blocks_cpu: bool = False


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


# Peak GPU memory of one decoder pass, per latent frame, in units of one last-stage activation (t_fac frames x
# H x W x last-stage width x element size; 0.29 GiB at 480p bf16). For Wan2.1 the peak sits in the last spatial
# upsample (diffusers upsamples in float32: input copy + float32 output + cast, ~7 units). Measured on an
# H200 at 480p (bench/vae_decode.py): 6.0 / 13.7 / 23.7 / 42.8 GiB at 1 / 5 / 10 / 20 latent frames per pass,
# i.e. ~14 + 6.8 units per frame; the figures below bound all four.
_PEAK_UNITS_PER_LATENT_FRAME = 7.0
_FIXED_UNITS = 15.0


def _unit_bytes(vae: AutoencoderKLWan, h: int, w: int, dtype: torch.dtype) -> int:
    cfg = vae.config
    t_fac = int(cfg.scale_factor_temporal or 4)
    s_fac = int(cfg.scale_factor_spatial or 8)
    patch = int(cfg.patch_size or 1)
    width = int(cfg.base_dim) * int(cfg.dim_mult[0])
    elt = torch.finfo(dtype).bits // 8
    return t_fac * (h * s_fac // patch) * (w * s_fac // patch) * width * elt


def free_bytes(device: torch.device) -> int | None:
    """Bytes a decode can use on ``device``: free device memory plus what PyTorch's cache holds unused."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0))


def plan_chunk(vae: AutoencoderKLWan, h: int, w: int, dtype: torch.dtype, *, max_chunk: int,
               free: int | None, memory_fraction: float = 0.8) -> int:
    """Latent frames per pass (after the first) that fit ``free`` bytes; ``max_chunk`` when unknown (CPU)."""
    max_chunk = max(1, int(max_chunk))
    if free is None:
        return max_chunk
    unit = _unit_bytes(vae, h, w, dtype)
    budget = memory_fraction * free - _FIXED_UNITS * unit
    return max(1, min(max_chunk, int(budget // (_PEAK_UNITS_PER_LATENT_FRAME * unit))))


@contextlib.contextmanager
def channels_last(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Conv weights in channels-last layout for the duration (restored after), so cuDNN runs NDHWC kernels."""
    if not enabled:
        yield
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.Conv2d):
            fmt = torch.channels_last_3d if isinstance(m, nn.Conv3d) else torch.channels_last
            saved.append((m.weight, m.weight.data))
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


@torch.no_grad()
def iter_decoded(vae: AutoencoderKLWan, z: torch.Tensor, *, options: DecodeOptions | None = None,
                 chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Pixels ([B, C, f, H, W], clamped to [-1, 1]) of de-normalized latents ``z`` [B, z, T, h, w] (VAE dtype and
    device), in order: latent frame 0 alone, then passes of up to ``chunk`` latent frames (default: planned
    from ``options`` and free memory). The VAE's cache is cleared before and after."""
    opts = options or DecodeOptions()
    n_lat, h, w = z.shape[2], z.shape[3], z.shape[4]
    if chunk is None:
        cap = opts.max_chunk if z.device.type == "cuda" else opts.cpu_max_chunk
        chunk = plan_chunk(vae, h, w, z.dtype, max_chunk=cap,
                           free=free_bytes(z.device) if opts.adaptive else None,
                           memory_fraction=opts.memory_fraction)
    k = max(1, int(chunk))
    patch = vae.config.patch_size
    layout = opts.channels_last and z.device.type == "cuda"
    vae.clear_cache()
    cache: list = vae._feat_map
    try:
        fast = opts.fast_blocks and (z.device.type == "cuda" or opts.fast_blocks_cpu)
        with channels_last(vae.decoder, layout), vae_fast.fast_forwards(vae.decoder, fast):
            x = vae.post_quant_conv(z)
            if layout:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            i = 0
            while i < n_lat:
                n = 1 if i == 0 else min(k, n_lat - i)
                snapshot = list(cache)
                out: torch.Tensor | None = None
                try:
                    idx = [0]
                    out = vae.decoder(x[:, :, i : i + n], feat_cache=cache, feat_idx=idx, first_chunk=i == 0)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                    if n == 1 or not _is_oom(exc):
                        raise
                if out is None:  # outside the except block, so the failed pass's tensors are already freed
                    cache[:] = snapshot
                    k = (n + 1) // 2  # n >= 2 here, so this always shrinks
                    if z.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if patch is not None:
                    out = unpatchify(out, patch_size=patch)
                yield out.clamp_(-1.0, 1.0)
                i += n
    finally:
        vae.clear_cache()
