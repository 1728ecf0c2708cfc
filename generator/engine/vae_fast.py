"""Faster forwards for the Wan VAE decoder's blocks, bound to the modules only while a decode runs.

diffusers' blocks spend most of the decode outside the convolutions (bench/RESULTS.md: 1.6 s at 480p x 81
frames on an H200 for ~0.6 s of convolution). Per residual block the stock code makes a float32 copy for
the RMS norm, normalises, casts back, scales, applies SiLU, concatenates the causal history in front and then
zero-pads the whole tensor again with ``F.pad`` before the convolution: six or so full passes over the
activation, some in float32, and a pad that can drop the channels-last layout cuDNN is fastest in. The
upsamplers interpolate in float32 (nearest-neighbour only copies values, so bf16 gives the same numbers).

Here, per causal convolution, one buffer is written once: the causal history (the cached frames, zeros where
there are none) followed by ``silu(rms_norm(x))``, computed in float32 and rounded once (one Triton kernel on
CUDA, torch ops elsewhere); the convolution then pads only in space, natively. The cache rules are diffusers'
own (the last ``CACHE_T`` activation frames, with the previous chunk's last frame in front when a chunk has a
single frame), so caches made here and by the stock blocks are interchangeable.

Same arithmetic as stock except the rounding points: stock rounds the normalised value to bf16 before the
scale, gamma and SiLU; here one rounding at the end (closer to the float32 decode). In float32 the two agree
to float32 rounding (tests/test_vae_fast.py).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
)
from torch import nn

from generator.engine import vae_kernels


def norm_act_with_history(norm: WanRMS_norm, x: torch.Tensor, history: torch.Tensor | None, pad: int,
                          keep: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([history frames (zeros in front where fewer than ``pad``), silu(rms_norm(x))] along time, in x's dtype;
    a separate copy of the last ``keep`` frames of silu(rms_norm(x)) (the next chunk's causal cache), or None).
    ``pad`` is the causal conv's time padding (0 for a conv with a time kernel of 1)."""
    b, c, t, h, w = x.shape
    n_hist = 0 if history is None or pad == 0 else min(pad, history.shape[2])
    use_kernel = b == 1 and vae_kernels.available(x)
    fmt = torch.channels_last_3d if (use_kernel or x.is_cuda) else torch.contiguous_format
    out = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if pad > n_hist:
        out[:, :, : pad - n_hist].zero_()
    if n_hist:
        assert history is not None
        out[:, :, pad - n_hist : pad].copy_(history[:, :, -n_hist:])
    gamma = norm.gamma.reshape(-1)
    bias = norm.bias.reshape(-1) if isinstance(norm.bias, torch.Tensor) else None
    keep = min(keep, t)
    if use_kernel:
        tail = torch.empty((b, c, keep, h, w), dtype=x.dtype, device=x.device, memory_format=fmt) if keep else None
        vae_kernels.rms_silu_into(x, gamma, bias, float(norm.scale), out[:, :, pad:], tail)
        return out, tail
    y = F.normalize(x.float(), dim=1) * (norm.scale * gamma.float().view(1, c, 1, 1, 1))
    if bias is not None:
        y = y + bias.float().view(1, c, 1, 1, 1)
    out[:, :, pad:] = F.silu(y).to(x.dtype)
    return out, (out[:, :, pad + t - keep :].clone() if keep else None)


def _conv(conv: WanCausalConv3d, padded: torch.Tensor) -> torch.Tensor:
    """The causal conv on an input whose time history is already in front: spatial padding done by the conv."""
    pw, ph = conv._padding[0], conv._padding[2]
    return F.conv3d(padded, conv.weight, conv.bias, conv.stride, (0, ph, pw), conv.dilation, conv.groups)


def _next_cache(act: torch.Tensor, previous: Any) -> torch.Tensor:
    """diffusers' rule: the last CACHE_T frames; a single-frame chunk keeps the previous chunk's last frame too."""
    return _with_previous(act[:, :, -CACHE_T:].clone(), previous)


def _with_previous(cache: torch.Tensor, previous: Any) -> torch.Tensor:
    if cache.shape[2] < 2 and isinstance(previous, torch.Tensor):
        cache = torch.cat([previous[:, :, -1:].to(cache.device), cache], dim=2)
    return cache


def _norm_act_conv(norm: WanRMS_norm, conv: WanCausalConv3d, x: torch.Tensor,
                   feat_cache: list[Any] | None, feat_idx: list[int]) -> torch.Tensor:
    pad = conv._padding[4]
    if feat_cache is None:
        return _conv(conv, norm_act_with_history(norm, x, None, pad)[0])
    idx = feat_idx[0]
    previous = feat_cache[idx]
    padded, tail = norm_act_with_history(norm, x, previous if isinstance(previous, torch.Tensor) else None, pad,
                                         keep=CACHE_T)
    assert tail is not None
    feat_cache[idx] = _with_previous(tail, previous)
    feat_idx[0] += 1
    return _conv(conv, padded)


def _causal_conv(conv: WanCausalConv3d, x: torch.Tensor, cache: Any) -> torch.Tensor:
    pad = conv._padding[4]
    if pad == 0:
        return _conv(conv, x)
    b, c, t, h, w = x.shape
    n_hist = min(pad, cache.shape[2]) if isinstance(cache, torch.Tensor) else 0
    fmt = torch.channels_last_3d if x.is_cuda else torch.contiguous_format
    padded = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if pad > n_hist:
        padded[:, :, : pad - n_hist].zero_()
    if n_hist:
        padded[:, :, pad - n_hist : pad].copy_(cache[:, :, -n_hist:])
    padded[:, :, pad:].copy_(x)
    return _conv(conv, padded)


def _interleave_halves(x: torch.Tensor) -> torch.Tensor:
    """[b, 2c, t, h, w] -> [b, c, 2t, h, w], output frame 2i + s being channel half s of input frame i
    (diffusers' reshape + stack), in one copy that leaves the result channels-last (pixels' channels
    contiguous) instead of three copies through the default layout."""
    b, c2, t, h, w = x.shape
    c = c2 // 2
    pixels = x.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c)  # a view when x is channels-last
    out = pixels.permute(0, 1, 4, 2, 3, 5).contiguous()  # [b, t, 2, h, w, c]: the one copy
    return out.view(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)


# --- forwards bound to the modules ---------------------------------------------------------------------


def _residual_forward(self: WanResidualBlock, x: torch.Tensor, feat_cache: list[Any] | None = None,
                      feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 - diffusers' signature
    if isinstance(self.conv_shortcut, WanCausalConv3d):
        h = _conv(self.conv_shortcut, x)  # 1x1x1: no padding, no history
    else:
        h = x
    x = _norm_act_conv(self.norm1, self.conv1, x, feat_cache, feat_idx)
    x = _norm_act_conv(self.norm2, self.conv2, x, feat_cache, feat_idx)  # dropout is 0 at inference
    return x.add_(h)


def _resample_forward(self: WanResample, x: torch.Tensor, feat_cache: list[Any] | None = None,
                      feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 - diffusers' signature
    b, c, t, h, w = x.shape
    if self.mode == "upsample3d" and feat_cache is not None:
        idx = feat_idx[0]
        previous = feat_cache[idx]
        if previous is None:
            feat_cache[idx] = "Rep"  # the first chunk is not doubled in time (diffusers' marker)
        else:
            cache = x[:, :, -CACHE_T:].clone()
            if cache.shape[2] < 2 and isinstance(previous, torch.Tensor):
                cache = torch.cat([previous[:, :, -1:].to(cache.device), cache], dim=2)
            elif cache.shape[2] < 2:  # "Rep": zero history
                cache = torch.cat([torch.zeros_like(cache), cache], dim=2)
            x = _causal_conv(self.time_conv, x, None if previous == "Rep" else previous)
            feat_cache[idx] = cache
            x = _interleave_halves(x)
        feat_idx[0] += 1
    t = x.shape[2]
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if self.mode in ("upsample2d", "upsample3d"):
        up, conv = self.resample[0], self.resample[1]
        # nearest-exact only copies values: bf16 in, bf16 out (stock goes through float32 for the same numbers)
        frames = F.interpolate(frames, scale_factor=up.scale_factor, mode=up.mode)
        if frames.is_cuda:
            frames = frames.contiguous(memory_format=torch.channels_last)
        frames = conv(frames)
    else:
        frames = self.resample(frames)
    out = frames.view(b, t, frames.shape[1], frames.shape[2], frames.shape[3]).permute(0, 2, 1, 3, 4)
    if self.mode == "downsample3d" and feat_cache is not None:  # encoder only; kept for completeness
        idx = feat_idx[0]
        if feat_cache[idx] is None:
            feat_cache[idx] = out.clone()
        else:
            cache = out[:, :, -1:].clone()
            out = self.time_conv(torch.cat([feat_cache[idx][:, :, -1:], out], 2))
            feat_cache[idx] = cache
        feat_idx[0] += 1
    return out


def _decoder_forward(self: WanDecoder3d, x: torch.Tensor, feat_cache: list[Any] | None = None,
                     feat_idx: list[int] = [0], first_chunk: bool = False) -> torch.Tensor:  # noqa: B006
    if feat_cache is not None:
        idx = feat_idx[0]
        previous = feat_cache[idx]
        feat_cache[idx] = _next_cache(x, previous)
        feat_idx[0] += 1
        x = _causal_conv(self.conv_in, x, previous)
    else:
        x = _causal_conv(self.conv_in, x, None)
    x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
    for up_block in self.up_blocks:
        x = up_block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
    return _norm_act_conv(self.norm_out, self.conv_out, x, feat_cache, feat_idx)


_FORWARDS: tuple[tuple[type[nn.Module], Any], ...] = (
    (WanResidualBlock, _residual_forward),
    (WanResample, _resample_forward),
    (WanDecoder3d, _decoder_forward),
)


def supported(decoder: nn.Module) -> bool:
    """The fast forwards assume SiLU blocks without dropout (every released Wan VAE decoder)."""
    for m in decoder.modules():
        if isinstance(m, WanResidualBlock):
            if not isinstance(m.nonlinearity, nn.SiLU) or (isinstance(m.dropout, nn.Dropout) and m.dropout.p):
                return False
        if isinstance(m, WanDecoder3d) and not isinstance(m.nonlinearity, nn.SiLU):
            return False
    return True


@contextlib.contextmanager
def fast_forwards(decoder: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Bind the fast forwards to ``decoder``'s blocks for the duration (yields whether they are in use)."""
    if not enabled or not supported(decoder):
        yield False
        return
    bound: list[nn.Module] = []
    try:
        for m in decoder.modules():
            for cls, fn in _FORWARDS:
                if type(m) is cls:  # subclasses may change the arithmetic: leave them stock
                    m.forward = types.MethodType(fn, m)
                    bound.append(m)
        yield True
    finally:
        for m in bound:
            del m.forward
