"""Block-wise int8 weights of TurboDiffusion ``-quant`` checkpoints (docs/engine.md section 3).

Each quantized linear is stored as ``int8_weight`` [out, in] plus ``scale`` fp32 [ceil(out/128), ceil(in/128)]:
one scale per 128x128 tile, ``q = round(w * 128 / amax)`` saturated to [-128, 127] and ``scale = amax / 128``,
so ``w ~= q * scale`` of its tile. Partial edge tiles use the same grid (the scale grid is ceil-sized).
"""

from __future__ import annotations

import torch

TILE = 128


def scale_grid_shape(out_features: int, in_features: int, tile: int = TILE) -> tuple[int, int]:
    """Shape of the per-tile scale grid for an [out, in] weight."""
    return (-(-out_features // tile), -(-in_features // tile))


def _expand_tiles(scale: torch.Tensor, shape: tuple[int, int], tile: int) -> torch.Tensor:
    """Per-element copy of the tile scale grid, cropped to ``shape``."""
    full = scale.repeat_interleave(tile, dim=0).repeat_interleave(tile, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_tiles(
    int8_weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, tile: int = TILE
) -> torch.Tensor:
    """``int8 * scale of its tile`` computed in float32, returned as ``dtype`` on the input's device."""
    if int8_weight.dtype != torch.int8 or int8_weight.ndim != 2:
        raise ValueError(f"expected a 2-D int8 weight, got {tuple(int8_weight.shape)} {int8_weight.dtype}")
    out_f, in_f = int8_weight.shape
    if tuple(scale.shape) != scale_grid_shape(out_f, in_f, tile):
        raise ValueError(
            f"scale grid {tuple(scale.shape)} does not fit a {out_f}x{in_f} weight in {tile}x{tile} tiles "
            f"(expected {scale_grid_shape(out_f, in_f, tile)})"
        )
    s = _expand_tiles(scale.to(device=int8_weight.device, dtype=torch.float32), (out_f, in_f), tile)
    return (int8_weight.to(torch.float32) * s).to(dtype)


def quantize_tiles(weight: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an [out, in] weight the way the -quant files store it: (int8 weight, fp32 tile scales)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    n_o, n_i = scale_grid_shape(out_f, in_f, tile)
    w = weight.detach().to(torch.float32)
    padded = w.new_zeros(n_o * tile, n_i * tile)
    padded[:out_f, :in_f] = w
    amax = padded.abs().view(n_o, tile, n_i, tile).amax(dim=(1, 3))  # [n_o, n_i]
    scale = amax / 128.0
    # An all-zero tile has amax 0: divide by 1 there instead (its values quantize to 0 either way).
    inv = torch.where(amax > 0, 128.0 / amax, torch.ones_like(amax))
    q = torch.round(w * _expand_tiles(inv, (out_f, in_f), tile)).clamp_(-128, 127).to(torch.int8)
    return q, scale
