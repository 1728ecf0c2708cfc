"""The Wan2.1 VAE as diffusers' ``AutoencoderKLWan``: loading (original ``Wan2.1_VAE.pth`` or a diffusers
folder), image-condition encoding and the one final decode.

The original file is a flat state dict of Wan's ``WanVAE_``: ``encoder.conv1``, ``encoder.downsamples.{i}``
(a flat list: per stage ``num_res_blocks`` residual blocks then a resample, none after the last stage),
``encoder.middle.{0,1,2}`` (residual, attention, residual), ``encoder.head.{0,2}`` (norm, conv), the same for
the decoder with ``decoder.upsamples.{i}`` (per stage ``num_res_blocks + 1`` residual blocks then a resample),
and the 1x1x1 ``conv1`` / ``conv2`` around the latent. Residual blocks are ``residual.{0,2,3,6}`` (norm,
conv, norm, conv) plus ``shortcut`` when the width changes. The mapping below is computed from the config
inferred from the file, so it holds for any depth, not only the released one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from generator.engine.host_copy import pipelined_to_host
from generator.engine.offline import ensure_offline

ensure_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from generator.engine.api import CheckpointError  # noqa: E402
from generator.engine.checkpoints import open_weights  # noqa: E402
from generator.engine.vae_chunked import DecodeOptions, iter_decoded  # noqa: E402
from generator.engine.weights import describe_weights  # noqa: E402

WAN_VAE_MARKER = "decoder.middle.0.residual.0.gamma"
_RES = {  # original residual-block sub-key -> diffusers
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESAMPLE_KEYS = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_ATTN_KEYS = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_INDEXED = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)$")


def is_wan_vae(keys: Mapping[str, Any] | list[str]) -> bool:
    return WAN_VAE_MARKER in set(keys)


# --------------------------------------------------------------------------------------------------
# Original layout -> config and key mapping
# --------------------------------------------------------------------------------------------------


def _indexed(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[int, dict[str, tuple[int, ...]]]:
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = _INDEXED.match(key)
        if m and m.group(1) == prefix:
            out.setdefault(int(m.group(2)), {})[m.group(3)] = shape
    return out


def wan_vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``AutoencoderKLWan`` kwargs for an original-layout Wan VAE state dict (from its shapes)."""
    try:
        base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
        z_dim = shapes["conv2.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"not a complete Wan VAE state dict (missing {e})") from None
    entries = _indexed(shapes, "encoder.downsamples")
    if not entries or sorted(entries) != list(range(len(entries))):
        raise CheckpointError("Wan VAE encoder.downsamples are missing or not numbered 0..n-1")
    stages: list[list[int]] = [[]]  # residual-block widths per stage
    temporal: list[bool] = []
    for i in range(len(entries)):
        sub = entries[i]
        if "residual.6.weight" in sub:
            stages[-1].append(sub["residual.6.weight"][0])
        elif "resample.1.weight" in sub:
            temporal.append("time_conv.weight" in sub)
            stages.append([])
        elif "to_qkv.weight" in sub:
            raise CheckpointError("Wan VAEs with attention inside the down blocks are not supported")
        else:
            raise CheckpointError(f"encoder.downsamples.{i} is neither a residual block nor a resample")
    counts = {len(s) for s in stages}
    if len(counts) != 1:
        raise CheckpointError(f"Wan VAE stages have different depths: {[len(s) for s in stages]}")
    num_res_blocks = counts.pop()
    if num_res_blocks < 1:
        raise CheckpointError("Wan VAE encoder stages hold no residual blocks")
    widths = [s[-1] for s in stages]
    if any(w % base_dim for w in widths):
        raise CheckpointError(f"Wan VAE widths {widths} are not multiples of the base width {base_dim}")
    out_channels = shapes.get("decoder.head.2.weight", (in_channels,))[0]
    cfg: dict[str, Any] = {
        "base_dim": int(base_dim),
        "z_dim": int(z_dim),
        "dim_mult": [int(w // base_dim) for w in widths],
        "num_res_blocks": int(num_res_blocks),
        "attn_scales": [],
        "temperal_downsample": temporal,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        # diffusers' defaults are Wan2.1's (8, 4); state what this file's depth really gives
        "scale_factor_spatial": 2 ** (len(widths) - 1),
        "scale_factor_temporal": 2 ** sum(temporal),
    }
    return cfg


def _decoder_slots(num_stages: int, num_res_blocks: int) -> dict[int, str]:
    """Flat ``decoder.upsamples`` index -> diffusers module path."""
    slots: dict[int, str] = {}
    i = 0
    for s in range(num_stages):
        for j in range(num_res_blocks + 1):
            slots[i] = f"decoder.up_blocks.{s}.resnets.{j}"
            i += 1
        if s != num_stages - 1:
            slots[i] = f"decoder.up_blocks.{s}.upsamplers.0"
            i += 1
    return slots


def _map_res_or_resample(path: str, sub: str) -> str | None:
    if sub in _RES:
        return f"{path}.{_RES[sub]}"
    if sub in _RESAMPLE_KEYS and (".upsamplers." in path or ".down_blocks." in path):
        return f"{path}.{sub}"
    return None


def _map_middle(side: str, rest: str) -> str | None:
    idx, _, sub = rest.partition(".")
    if idx in ("0", "2") and sub in _RES:
        return f"{side}.mid_block.resnets.{int(idx) // 2}.{_RES[sub]}"
    if idx == "1" and sub in _ATTN_KEYS:
        return f"{side}.mid_block.attentions.0.{sub}"
    return None


def wan_vae_key(key: str, config: Mapping[str, Any]) -> str | None:
    """The diffusers name of one original key (None when it has none)."""
    top = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
           "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
    if key in top:
        return top[key]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest[len('conv1.'):]}"
    if rest == "head.0.gamma":
        return f"{side}.norm_out.gamma"
    if rest.startswith("head.2."):
        return f"{side}.conv_out.{rest[len('head.2.'):]}"
    if rest.startswith("middle."):
        return _map_middle(side, rest[len("middle."):])
    m = _INDEXED.match(key)
    if m is None:
        return None
    index, sub = int(m.group(2)), m.group(3)
    if side == "encoder":
        return _map_res_or_resample(f"encoder.down_blocks.{index}", sub)
    slots = _decoder_slots(len(config["dim_mult"]), int(config["num_res_blocks"]))
    if index not in slots:
        return None
    return _map_res_or_resample(slots[index], sub)


def wan_vae_mapping(keys: list[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers key -> original key for every tensor; raises ``CheckpointError`` on a key with no slot."""
    mapping: dict[str, str] = {}
    stray: list[str] = []
    for key in keys:
        target = wan_vae_key(key, config)
        if target is None:
            stray.append(key)
        else:
            mapping[target] = key
    if stray:
        raise CheckpointError(f"unexpected tensors for a Wan2.1 VAE: {', '.join(stray[:5])}")
    return mapping


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_vae(path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` from the original ``Wan2.1_VAE.pth`` or a diffusers folder (offline)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"VAE {p} does not exist")
    if p.is_dir():
        folder = p if (p / "config.json").exists() or not (p / "vae").is_dir() else p / "vae"
        try:
            vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{folder} is not a diffusers AutoencoderKLWan folder: {e}") from e
        return vae.to(device).eval().requires_grad_(False)
    src = open_weights(p)
    shapes = dict(src.shapes)
    if not is_wan_vae(shapes):
        raise CheckpointError(f"{p} is not a Wan2.1 VAE (Wan2.1_VAE.pth layout); it looks like {describe_weights(shapes)}")
    config = wan_vae_config(shapes)
    mapping = wan_vae_mapping(list(shapes), config)
    try:
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
    except Exception as e:
        raise CheckpointError(f"{p}: unsupported Wan VAE shape {config}: {e}") from e
    expected = {k: tuple(t.shape) for k, t in vae.state_dict().items()}
    missing = sorted(set(expected) - set(mapping))
    extra = sorted(set(mapping) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{p}: Wan VAE tensors do not match the inferred model "
            f"(missing {missing[:3]}, unexpected {[mapping[k] for k in extra[:3]]})"
        )
    tensors: dict[str, torch.Tensor] = {}
    for target, source in mapping.items():
        if shapes[source] != expected[target]:
            raise CheckpointError(f"{p}: {source} has shape {shapes[source]}, expected {expected[target]}")
        tensors[target] = src.get(source).to(device=device, dtype=dtype)
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Using it
# --------------------------------------------------------------------------------------------------


def factors(vae: AutoencoderKLWan) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE (4, 8 for Wan2.1)."""
    cfg = vae.config
    return int(cfg.scale_factor_temporal or 4), int(cfg.scale_factor_spatial or 8)


def latent_stats(vae: AutoencoderKLWan, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as [1, z, 1, 1, 1]: normalized latent = (mu - mean) / std."""
    z = int(vae.config.z_dim)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    return mean.to(device=device, dtype=dtype), std.to(device=device, dtype=dtype)


def _device_dtype(vae: AutoencoderKLWan) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_mean(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Posterior mean of ``video`` [B, 3, F, H, W] in [-1, 1], normalized with latents_mean/std (float32)."""
    device, dtype = _device_dtype(vae)
    mu = vae.encode(video.to(device=device, dtype=dtype)).latent_dist.mode().float()
    mean, std = latent_stats(vae, mu.device, torch.float32)
    return (mu - mean) / std


# The untiled decode's settings; benchmarks may replace it (``vae.DECODE_OPTIONS = DecodeOptions(...)``).
DECODE_OPTIONS = DecodeOptions()


@torch.no_grad()
def decode(vae: AutoencoderKLWan, latents: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
    """Normalized latents [B, z, T, h, w] -> video [B, 3, F, H, W] in [-1, 1] (VAE dtype, VAE device).

    Untiled, the causal decoder runs latent frame 0 alone and then several latent frames per pass
    (``vae_chunked``: same result as diffusers' frame-by-frame loop, far fewer kernels). Tiled, diffusers' own
    tiled decode is used (the out-of-memory fallback).
    """
    if tiled:
        device, dtype = _device_dtype(vae)
        mean, std = latent_stats(vae, device, torch.float32)
        z = (latents.to(device=device, dtype=torch.float32) * std + mean).to(dtype)
        vae.enable_tiling()
        try:
            return vae.decode(z).sample
        finally:
            vae.disable_tiling()
    return torch.cat(list(_decoded_chunks(vae, latents)), dim=2)


def _decoded_chunks(vae: AutoencoderKLWan, latents: torch.Tensor, *,
                    options: DecodeOptions | None = None) -> Iterator[torch.Tensor]:
    """Pixels of each decoder pass in turn ([1, 3, f, H, W], clamped), through the causal cache."""
    device, dtype = _device_dtype(vae)
    mean, std = latent_stats(vae, device, torch.float32)
    z = (latents.to(device=device, dtype=torch.float32) * std + mean).to(dtype)
    yield from iter_decoded(vae, z, options=options or DECODE_OPTIONS)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the CPU (converted on the video's device)."""
    return _chunk_to_uint8(video).cpu().numpy()


def _chunk_to_uint8(video: torch.Tensor) -> torch.Tensor:
    v = video[0].float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous()


@torch.no_grad()
def decode_uint8(vae: AutoencoderKLWan, latents: torch.Tensor, *, tiled: bool = False) -> np.ndarray:
    """``decode`` straight to uint8 [F, H, W, 3] frames on the CPU."""
    if tiled:
        return to_uint8_frames(decode(vae, latents, tiled=True))
    return np.concatenate(list(iter_uint8_chunks(vae, latents)), axis=0)


@torch.no_grad()
def iter_uint8_chunks(vae: AutoencoderKLWan, latents: torch.Tensor) -> Iterator[np.ndarray]:
    """The untiled decode as uint8 [f, H, W, 3] CPU chunks, one per decoder pass, in order.

    Each chunk is converted on the VAE's device as soon as it is decoded, so the float video is never held
    whole. On CUDA the copy to (pinned) host memory is asynchronous and a chunk is handed out only once the
    next one is queued, so the GPU keeps decoding while the caller (the mp4 encoder) consumes.
    """
    yield from pipelined_to_host(_chunk_to_uint8(chunk) for chunk in _decoded_chunks(vae, latents))

