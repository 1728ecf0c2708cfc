"""Live previews: a few small RGB frames of the sampler's current x0 estimate, made cheaply between steps.

Two decoders, chosen per model by the engine:

- on a GPU, the model's tiny (TAEHV) decoder, when one is configured, run on a few latent frames at reduced
  spatial size (a few percent of a full tiny decode);
- otherwise, and always on the CPU (where the tiny decoder takes ~1 s a preview even for the demo model, too
  much for a 5% budget), ``LINEAR_RGB``: a fixed 16 -> 3 projection of the *normalized* Wan2.1 latent plus a bias.

The linear projection is an approximation, not a decoder. It was not fitted to a VAE's outputs (no weights
are shipped with this project); it rests on the normalization idea: the full VAE's latents are stored as
``(mu - latents_mean) / latents_std``, so every channel of a sampled latent is roughly zero-mean and unit
variance. Mapping those unit-scale channels to colour with the same weight norm for each colour therefore gives
outputs that all vary over the same range, and the bias of 0.5 puts the average latent at mid-grey. The rows give each channel
a sign pattern over (R, G, B) so that the first four channels act on brightness and the rest on opponent
colour axes (R-G, B-(R+G)/2): spatial structure and motion show, colours are only indicative.

Everything here returns uint8 ``[F, H, W, 3]`` numpy arrays on the CPU, small enough (F <= 8, longest side
<= 256) that the worker can encode them off the render thread.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from generator.engine import taehv

PREVIEW_FRAMES = 6  # frames of a preview, evenly spaced over the clip's latent frames
PREVIEW_SIDE = 256  # longest side of a preview frame, in pixels

_ROW_NORM = 0.18  # each colour's standard deviation for unit-variance channels: +-2.7 sigma stays in [0, 1]


def _linear_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed [16, 3] projection and [3] bias (see the module docstring for how they are chosen)."""
    luma = (1.0, 1.0, 1.0)
    red_green = (1.0, -1.0, 0.0)
    blue_yellow = (-0.5, -0.5, 1.0)
    rows = []
    for c in range(16):
        if c < 4:
            axis = luma
        elif c % 2 == 0:
            axis = red_green
        else:
            axis = blue_yellow
        sign = 1.0 if (c // 2) % 2 == 0 else -1.0  # alternating signs so no channel pair cancels out exactly
        rows.append([sign * a for a in axis])
    weight = torch.tensor(rows, dtype=torch.float32)
    weight = weight / weight.norm(dim=0, keepdim=True) * _ROW_NORM  # every colour: same spread
    return weight, torch.full((3,), 0.5)


LINEAR_RGB, LINEAR_BIAS = _linear_weights()


def frame_indices(latent_frames: int, count: int = PREVIEW_FRAMES) -> list[int]:
    """``count`` latent frame indices evenly spaced from the first to the last (fewer for short clips)."""
    if latent_frames <= count:
        return list(range(latent_frames))
    return sorted({round(i * (latent_frames - 1) / (count - 1)) for i in range(count)})


def _fit(video: torch.Tensor, side: int) -> torch.Tensor:
    """[F, 3, H, W] in [0, 1] -> uint8 [F, H', W', 3] with the longest side at most ``side`` (area filter)."""
    h, w = video.shape[-2:]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        size = (max(2, round(h * scale) // 2 * 2), max(2, round(w * scale) // 2 * 2))
        video = F.interpolate(video.float(), size=size, mode="area")
    return video.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def linear_preview(latents: torch.Tensor, *, spatial_factor: int = 8, frames: int = PREVIEW_FRAMES,
                   side: int = PREVIEW_SIDE) -> np.ndarray:
    """Normalized latents [1, 16, T, h, w] -> uint8 [F, H, W, 3]: ``LINEAR_RGB`` per latent pixel, upsampled
    toward the video's size (``spatial_factor`` times the latent's) but no larger than ``side``."""
    z = latents[0, :, frame_indices(latents.shape[2], frames)].float()  # [16, F, h, w]
    weight, bias = LINEAR_RGB.to(z.device), LINEAR_BIAS.to(z.device)
    if z.shape[0] != weight.shape[0]:
        raise ValueError(f"the linear preview is for {weight.shape[0]}-channel latents, got {z.shape[0]}")
    rgb = torch.einsum("cfhw,cd->fdhw", z, weight) + bias.view(1, 3, 1, 1)
    h, w = rgb.shape[-2:]
    scale = min(float(spatial_factor), side / max(h, w))
    if scale > 1.0:
        rgb = F.interpolate(rgb, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
    return _fit(rgb, side).cpu().numpy()


@torch.no_grad()
def tiny_preview(model: taehv.TinyDecoder, latents: torch.Tensor, *, frames: int = PREVIEW_FRAMES,
                 side: int = PREVIEW_SIDE) -> np.ndarray:
    """Un-normalized latents [1, z, T, h, w] -> uint8 [F, H, W, 3] through the tiny decoder: only the chosen
    latent frames (as one short clip, so each sees the previous chosen one as its past), average-pooled in
    space first so the decoder's output is about twice ``side`` at most; the last output frame of each."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    z = latents[:, :, frame_indices(latents.shape[2], frames)].to(device=device, dtype=torch.float32)
    longest, pool = max(z.shape[-2:]), 1
    while longest * model.spatial_factor / pool > 2 * side and longest // (pool * 2) >= 4:
        pool *= 2
    if pool > 1:
        z = F.avg_pool2d(z[0].transpose(0, 1), pool).transpose(0, 1).unsqueeze(0)
    out = model.forward_frames(z.to(dtype).permute(0, 2, 1, 3, 4), model.empty_state())  # [1, F*t, 3, H, W]
    t = model.temporal_factor
    picked = out[0, t - 1::t]  # the last output frame of each latent frame
    return _fit(picked, side).cpu().numpy()
