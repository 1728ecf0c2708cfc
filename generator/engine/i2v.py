"""Image-to-video conditioning (docs/engine.md section 5): the input image, adaptive size, mask + VAE latent."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from generator.engine.api import EngineError


def adaptive_size(image_w: int, image_h: int, base_w: int, base_h: int, multiple: int = 16) -> tuple[int, int]:
    """(w, h) with the area of base_w x base_h and the image's aspect ratio, each a multiple of ``multiple``:
    w = round(sqrt(area / r) / m) * m, h = round(sqrt(area * r) / m) * m with r = image_h / image_w."""
    if image_w <= 0 or image_h <= 0:
        raise ValueError(f"bad image size {image_w}x{image_h}")
    area = base_w * base_h
    r = image_h / image_w
    w = round(math.sqrt(area / r) / multiple) * multiple
    h = round(math.sqrt(area * r) / multiple) * multiple
    return max(multiple, w), max(multiple, h)


def open_image(path: str | Path) -> Image.Image:
    """The input image as RGB (EXIF orientation applied); EngineError when it cannot be read."""
    try:
        with Image.open(path) as raw:
            return ImageOps.exif_transpose(raw).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise EngineError("The input image could not be read.", code="bad_image") from e


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Stretch (no crop) to width x height, scale to [-1, 1]: float32 [1, 3, H, W]."""
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).unsqueeze(0).float().div(127.5).sub(1.0)


def conditioning_video(image: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, 3, frames, H, W]: the image as frame 0, then frames - 1 zero frames."""
    b, c, h, w = image.shape
    video = torch.zeros(b, c, frames, h, w, dtype=image.dtype, device=image.device)
    video[:, :, 0] = image
    return video


def first_frame_mask(latent_frames: int, height: int, width: int, channels: int = 4) -> torch.Tensor:
    """[1, channels, T_lat, h, w] with latent frame 0 set to 1, the rest 0 (channels = temporal factor)."""
    mask = torch.zeros(1, channels, latent_frames, height, width)
    mask[:, :, 0] = 1.0
    return mask


def condition(mask: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """y = cat([mask, image latent]) over channels: 4 + 16 = 20 channels for Wan."""
    if mask.shape[2:] != image_latent.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} and latent {tuple(image_latent.shape)} differ in size")
    return torch.cat([mask.to(image_latent), image_latent], dim=1)
