"""Synthetic weight files in the original TurboDiffusion / Wan layouts (random tensors, tiny configs), written
from the structure of Wan's own modules, independently of the engine's loaders."""

from __future__ import annotations

import itertools

import torch

Shapes = dict[str, tuple[int, ...]]


def wan_t5_state_dict(seed: int = 0, *, vocab: int = 64, dim: int = 16, heads: int = 4, ffn: int = 24,
                      layers: int = 2, buckets: int = 32) -> dict[str, torch.Tensor]:
    """An encoder in the layout of models_t5_umt5-xxl-enc-bf16.pth (Wan's T5Encoder, shared_pos=False)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    sd = {"token_embedding.weight": r(vocab, dim, scale=1.0), "norm.weight": 1 + r(dim, scale=0.1)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + r(dim, scale=0.1)
        sd[p + "norm2.weight"] = 1 + r(dim, scale=0.1)
        for n in "qkvo":
            sd[p + f"attn.{n}.weight"] = r(dim, dim)
        sd[p + "ffn.gate.0.weight"] = r(ffn, dim)
        sd[p + "ffn.fc1.weight"] = r(ffn, dim)
        sd[p + "ffn.fc2.weight"] = r(dim, ffn)
        sd[p + "pos_embedding.embedding.weight"] = r(buckets, heads)
    return sd


def wan_vae_shapes(dim: int, z: int, dim_mult: list[int], nrb: int, temporal: list[bool]) -> Shapes:
    """Tensor shapes of Wan's original WanVAE_ (Encoder3d / Decoder3d as Wan2.1 builds them)."""
    s: Shapes = {}

    def conv3(name: str, cin: int, cout: int, k: tuple[int, int, int] = (3, 3, 3)) -> None:
        s[name + ".weight"], s[name + ".bias"] = (cout, cin, *k), (cout,)

    def conv2(name: str, cin: int, cout: int, k: int) -> None:
        s[name + ".weight"], s[name + ".bias"] = (cout, cin, k, k), (cout,)

    def rms(name: str, d: int, images: bool = False) -> None:
        s[name + ".gamma"] = (d, 1, 1) if images else (d, 1, 1, 1)

    def res(name: str, cin: int, cout: int) -> None:
        rms(name + ".residual.0", cin)
        conv3(name + ".residual.2", cin, cout)
        rms(name + ".residual.3", cout)
        conv3(name + ".residual.6", cout, cout)
        if cin != cout:
            conv3(name + ".shortcut", cin, cout, (1, 1, 1))

    def attn(name: str, d: int) -> None:
        rms(name + ".norm", d, images=True)
        conv2(name + ".to_qkv", d, 3 * d, 1)
        conv2(name + ".proj", d, d, 1)

    def resample(name: str, d: int, mode: str) -> None:
        if mode.startswith("up"):
            conv2(name + ".resample.1", d, d // 2, 3)
            if mode == "upsample3d":
                conv3(name + ".time_conv", d, 2 * d, (3, 1, 1))
        else:
            conv2(name + ".resample.1", d, d, 3)
            if mode == "downsample3d":
                conv3(name + ".time_conv", d, d, (3, 1, 1))

    dims = [dim * u for u in [1, *dim_mult]]
    conv3("encoder.conv1", 3, dims[0])
    idx = 0
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        for _ in range(nrb):
            res(f"encoder.downsamples.{idx}", a, b)
            idx, a = idx + 1, b
        if i != len(dim_mult) - 1:
            resample(f"encoder.downsamples.{idx}", b, "downsample3d" if temporal[i] else "downsample2d")
            idx += 1
    out = dims[-1]
    res("encoder.middle.0", out, out)
    attn("encoder.middle.1", out)
    res("encoder.middle.2", out, out)
    rms("encoder.head.0", out)
    conv3("encoder.head.2", out, 2 * z)
    conv3("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv3("conv2", z, z, (1, 1, 1))

    up = temporal[::-1]
    dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    conv3("decoder.conv1", z, dims[0])
    res("decoder.middle.0", dims[0], dims[0])
    attn("decoder.middle.1", dims[0])
    res("decoder.middle.2", dims[0], dims[0])
    idx = 0
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        if i in (1, 2, 3):
            a //= 2
        for _ in range(nrb + 1):
            res(f"decoder.upsamples.{idx}", a, b)
            idx, a = idx + 1, b
        if i != len(dim_mult) - 1:
            resample(f"decoder.upsamples.{idx}", b, "upsample3d" if up[i] else "upsample2d")
            idx += 1
    rms("decoder.head.0", dims[-1])
    conv3("decoder.head.2", dims[-1], 3)
    return s


def wan_vae_state_dict(seed: int = 0, *, dim: int = 4, z: int = 16, dim_mult: list[int] | None = None, nrb: int = 1,
                       temporal: list[bool] | None = None, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = wan_vae_shapes(dim, z, dim_mult or [1, 2, 2, 2], nrb, temporal or [True, False, True])
    return {k: torch.randn(*s, generator=g) * scale for k, s in shapes.items()}
