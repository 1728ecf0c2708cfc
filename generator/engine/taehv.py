"""A tiny video decoder for Wan2.1 latents in the TAEHV layout (``taew2_1.pth``, ``lighttaew2_1.pth``).

It trades quality for speed: a few 2-D convolutions per frame with a one-frame memory instead of the causal
3-D VAE decoder. The file is a flat state dict of ``encoder.<i>.*`` / ``decoder.<i>.*`` (``nn.Sequential``
indices); only the decoder is used. Decoder layout (index: layer):

  0 Clamp (tanh(x/3)*3)   1 Conv(16 -> n0) + bias   2 ReLU   3-5 MemBlock(n0)   6 Upsample x2   7 TGrow(n0, s0)
  8 Conv(n0 -> n1)        9-11 MemBlock(n1)         12 Upsample x2             13 TGrow(n1, s1)
  14 Conv(n1 -> n2)       15-17 MemBlock(n2)        18 Upsample x2             19 TGrow(n2, s2)
  20 Conv(n2 -> n3)       21 ReLU                   22 Conv(n3 -> 3*p*p) + bias (pixel shuffle by p)

A MemBlock sees its own input of the previous time step (zeros at the first), a TGrow turns each time step into
``stride`` consecutive ones. Widths, the patch ``p`` and the stored strides come from the file's shapes; the
strides used are the configured time upscale (Wan2.1: 1, 2, 2), and a stride-2 weight in a stride-1 slot keeps
its last time step's channels. The first ``t - 1`` output frames (t = temporal factor) are dropped, so T latent
frames give ``t*(T-1) + 1`` frames like the full VAE. Output is RGB in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from generator.engine.host_copy import pipelined_to_host
from generator.engine.offline import ensure_offline

ensure_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from generator.engine.api import CheckpointError  # noqa: E402
from generator.engine.checkpoints import open_weights  # noqa: E402
from generator.engine.weights import describe_weights  # noqa: E402

WAN21_LATENT_CHANNELS = 16
WAN21_TIME_UPSCALE = (False, True, True)  # per TGrow (indices 7, 13, 19): does it double the frame rate?
_CONV_IN, _CONV_MID, _CONV_OUT = 1, (8, 14, 20), 22
_MEMBLOCKS = ((3, 4, 5), (9, 10, 11), (15, 16, 17))
_TGROWS = (7, 13, 19)
_UPSAMPLES = (6, 12, 18)
# Keys only a full Wan VAE has (original and diffusers layouts); checked here without importing diffusers.
_FULL_VAE_PREFIXES = ("decoder.middle.", "decoder.mid_block.", "decoder.conv_out.", "decoder.head.")
_KEY = re.compile(r"^decoder\.(\d+)\.(.+)$")
# Latent channels of other VAEs' tiny decoders, to say which one a refused file is for.
_OTHER_FAMILIES = {48: "Wan2.2's 48-channel VAE (TI2V-5B)", 32: "HunyuanVideo 1.5's VAE", 12: "Mochi's VAE",
                   128: "LTX-Video's VAE"}


@dataclass(frozen=True)
class TinySpec:
    """What a file's shapes say: widths, the latent channels, the patch and the strides."""

    latent_channels: int
    widths: tuple[int, int, int, int]  # n0..n3
    memblocks: tuple[tuple[tuple[int, int], ...], ...]  # per stage, per block: (n_in, n_out)
    strides: tuple[int, int, int]  # used
    file_strides: tuple[int, int, int]  # stored
    patch: int


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class MemBlock(nn.Module):
    """relu(conv(cat(x, x of the previous time step)) + skip(x))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out),
                                  nn.ReLU(inplace=True), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """A 1x1 conv to ``stride`` channel groups; group g of time step t becomes time step t*stride + g."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        f, c, h, w = y.shape
        return y.reshape(f * self.stride, c // self.stride, h, w)


class TinyDecoder(nn.Module):
    """The TAEHV decoder; its state dict keys are the file's (``decoder.<i>.*``)."""

    turbo_checkpoint: str = ""  # the file it was loaded from

    def __init__(self, spec: TinySpec) -> None:
        super().__init__()
        self.spec = spec
        n = spec.widths
        layers: list[nn.Module] = [Clamp(), _conv(spec.latent_channels, n[0]), nn.ReLU(inplace=True)]
        for stage in range(3):
            layers += [MemBlock(a, b) for a, b in spec.memblocks[stage]]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), TGrow(n[stage], spec.strides[stage]),
                       _conv(n[stage], n[stage + 1], bias=False)]
        layers += [nn.ReLU(inplace=True), _conv(n[3], 3 * spec.patch**2)]
        self.decoder = nn.Sequential(*layers)

    @property
    def temporal_factor(self) -> int:
        return int(np.prod(self.spec.strides))

    @property
    def spatial_factor(self) -> int:
        return 8 * self.spec.patch

    def factors(self) -> tuple[int, int]:
        """(temporal, spatial), as ``vae.factors`` gives them for the full VAE."""
        return self.temporal_factor, self.spatial_factor

    def empty_state(self) -> list[torch.Tensor | None]:
        return [None] * sum(isinstance(m, MemBlock) for m in self.decoder)

    def forward_frames(self, x: torch.Tensor, state: list[torch.Tensor | None]) -> torch.Tensor:
        """Frames [B, T, C, h, w] (un-normalized latents) -> [B, T*t, 3, H, W] in [0, 1], nothing dropped.

        ``state`` holds each MemBlock's input at the last time step seen (None: the start of the video) and is
        updated in place, so decoding a video in consecutive pieces gives the same frames as decoding it whole.
        """
        b, t = x.shape[:2]
        h = x.reshape(b * t, *x.shape[2:])
        mem = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                seq = h.view(b, t, *h.shape[1:])
                prev = state[mem]
                first = torch.zeros_like(seq[:, :1]) if prev is None else prev
                past = torch.cat([first, seq[:, :-1]], dim=1).reshape(h.shape)
                state[mem] = seq[:, -1:].clone()
                mem += 1
                h = layer(h, past)
            elif isinstance(layer, TGrow):
                h = layer(h)
                t *= layer.stride
            else:
                h = layer(h)
        if self.spec.patch > 1:
            h = F.pixel_shuffle(h, self.spec.patch)
        return h.clamp_(0.0, 1.0).view(b, t, *h.shape[1:])


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _family_hint(channels: int) -> str:
    other = _OTHER_FAMILIES.get(channels)
    return f" (a tiny decoder for {other})" if other else ""


def tiny_spec(shapes: dict[str, tuple[int, ...]], *, where: str = "the file",
              time_upscale: Sequence[bool] = WAN21_TIME_UPSCALE,
              latent_channels: int = WAN21_LATENT_CHANNELS) -> TinySpec:
    """The decoder's spec from its tensor shapes (``decoder.<i>.*`` keys); ``CheckpointError`` naming
    ``where`` when they do not form a TAEHV decoder for ``latent_channels``-channel latents."""

    def shape(key: str, rank: int) -> tuple[int, ...]:
        s = shapes.get(key)
        if s is None:
            raise CheckpointError(f"{where} is not a complete TAEHV tiny decoder: {key} is missing")
        if len(s) != rank:
            raise CheckpointError(f"{where}: {key} has shape {s}, not a TAEHV tiny decoder tensor")
        return s

    cin = shape(f"decoder.{_CONV_IN}.weight", 4)
    if cin[1] != latent_channels:
        raise CheckpointError(
            f"{where} is a tiny decoder for {cin[1]}-channel latents{_family_hint(cin[1])}; the Wan2.1 VAE "
            f"these models use has {latent_channels} latent channels (use taew2_1.pth / lighttaew2_1.pth)"
        )
    width = cin[0]
    widths = [width]
    memblocks: list[tuple[tuple[int, int], ...]] = []
    strides: list[int] = []
    file_strides: list[int] = []
    for stage in range(3):
        blocks = []
        for i in _MEMBLOCKS[stage]:
            w0 = shape(f"decoder.{i}.conv.0.weight", 4)
            n_out, n_in = w0[0], w0[1] // 2
            if w0[1] != 2 * width:
                raise CheckpointError(f"{where}: decoder.{i} takes {w0[1]} channels, expected 2 x {width}")
            blocks.append((n_in, n_out))
            width = n_out
        memblocks.append(tuple(blocks))
        i = _TGROWS[stage]
        g = shape(f"decoder.{i}.conv.weight", 4)
        if g[1] != width or g[0] % width:
            raise CheckpointError(f"{where}: decoder.{i}.conv.weight has shape {g}, expected [k*{width}, {width}, 1, 1]")
        stored, wanted = g[0] // width, 2 if time_upscale[stage] else 1
        if stored != wanted and not (wanted == 1 and stored > 1):
            raise CheckpointError(
                f"{where}: decoder.{i} upsamples time by {stored} where Wan2.1's tiny decoder needs {wanted}; "
                "it is a tiny decoder for another VAE"
            )
        file_strides.append(stored)
        strides.append(wanted)
        conv = shape(f"decoder.{_CONV_MID[stage]}.weight", 4)
        if conv[1] != width:
            raise CheckpointError(f"{where}: decoder.{_CONV_MID[stage]} takes {conv[1]} channels, expected {width}")
        width = conv[0]
        widths.append(width)
    out = shape(f"decoder.{_CONV_OUT}.weight", 4)
    patch = round((out[0] / 3) ** 0.5)
    if out[1] != width or patch < 1 or 3 * patch * patch != out[0]:
        raise CheckpointError(f"{where}: decoder.{_CONV_OUT}.weight has shape {out}, expected [3*p*p, {width}, 3, 3]")
    return TinySpec(latent_channels=latent_channels, widths=(widths[0], widths[1], widths[2], widths[3]),
                    memblocks=tuple(memblocks), strides=(strides[0], strides[1], strides[2]),
                    file_strides=(file_strides[0], file_strides[1], file_strides[2]), patch=patch)


def _adapt(key: str, tensor: torch.Tensor, spec: TinySpec) -> torch.Tensor:
    """A TGrow weight stored with a larger stride than its slot uses keeps the last time step's channels."""
    for stage, i in enumerate(_TGROWS):
        if key == f"decoder.{i}.conv.weight" and spec.file_strides[stage] != spec.strides[stage]:
            n = spec.widths[stage]
            return tensor[-n * spec.strides[stage]:]
    return tensor


def load_tiny_decoder(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      time_upscale: Sequence[bool] = WAN21_TIME_UPSCALE,
                      latent_channels: int = WAN21_LATENT_CHANNELS) -> TinyDecoder:
    """The decoder of a TAEHV ``.pth`` / ``.safetensors`` file (encoder tensors, when present, are ignored)."""
    p = Path(path).expanduser()
    try:
        src = open_weights(p)
    except CheckpointError as exc:
        raise CheckpointError(f"Tiny decoder: {exc}") from exc
    if p.is_dir():
        raise CheckpointError(f"Tiny decoder {p} is a folder; name the taew2_1.pth / .safetensors file itself")
    shapes = dict(src.shapes)
    where = f"Tiny decoder {p}"
    if any(k.startswith(_FULL_VAE_PREFIXES) for k in shapes):
        raise CheckpointError(f"{where} is the full Wan VAE (Wan2.1_VAE.pth), not a tiny decoder; set it as "
                              "the model's vae and name taew2_1.pth as tiny_decoder")
    decoder_keys = [k for k in shapes if k.startswith("decoder.")]
    stray = sorted(k for k in shapes if not k.startswith(("decoder.", "encoder.")))
    if not decoder_keys or stray or not all(_KEY.match(k) for k in decoder_keys):
        raise CheckpointError(f"{where} is not a TAEHV tiny decoder (decoder.<i>.* tensors); it looks like "
                              f"{describe_weights(shapes)}")
    spec = tiny_spec(shapes, where=where, time_upscale=time_upscale, latent_channels=latent_channels)
    with torch.device("meta"):
        model = TinyDecoder(spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(decoder_keys))
    extra = sorted(set(decoder_keys) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
            ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise CheckpointError(f"{where}: decoder tensors do not match the TAEHV layout ({'; '.join(parts)})")
    tensors: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        t = src.get(key)
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: {key} holds {t.dtype} values, not weights")
        t = _adapt(key, t, spec)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {want}")
        tensors[key] = t.to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.turbo_checkpoint = str(p)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _device_dtype(model: TinyDecoder) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _frames(model: TinyDecoder, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, T, h, w] -> [B, T, C, h, w] on the decoder's device and dtype."""
    device, dtype = _device_dtype(model)
    return latents.to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def decode(model: TinyDecoder, latents: torch.Tensor) -> torch.Tensor:
    """Un-normalized latents [B, C, T, h, w] -> video [B, 3, t*(T-1)+1, H, W] in [0, 1], all frames at once."""
    out = model.forward_frames(_frames(model, latents), model.empty_state())
    return out[:, model.temporal_factor - 1:].permute(0, 2, 1, 3, 4)


@torch.no_grad()
def iter_decoded(model: TinyDecoder, latents: torch.Tensor, *, chunk_frames: int = 4) -> Iterator[torch.Tensor]:
    """The same video as ``decode``, ``chunk_frames`` latent frames per pass ([B, 3, f, H, W] each, in order),
    with each MemBlock's last input carried between passes: memory does not grow with the clip's length."""
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be at least 1")
    x = _frames(model, latents)
    state = model.empty_state()
    drop = model.temporal_factor - 1
    for start in range(0, x.shape[1], chunk_frames):
        out = model.forward_frames(x[:, start:start + chunk_frames], state)
        if drop:
            out, drop = out[:, drop:], max(0, drop - out.shape[1])
        if out.shape[1]:
            yield out.permute(0, 2, 1, 3, 4)


def _chunk_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, f, H, W] in [0, 1] -> uint8 [f, H, W, 3] on the same device."""
    v = video[0].float().clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous()


@torch.no_grad()
def iter_uint8_chunks(model: TinyDecoder, latents: torch.Tensor, *, chunk_frames: int = 4) -> Iterator[np.ndarray]:
    """``iter_decoded`` as uint8 [f, H, W, 3] CPU chunks (what ``vae.iter_uint8_chunks`` gives for the full VAE).
    On CUDA each chunk is copied to pinned memory asynchronously and handed out once the next one is queued."""
    yield from pipelined_to_host(_chunk_to_uint8(chunk) for chunk in iter_decoded(model, latents, chunk_frames=chunk_frames))



@torch.no_grad()
def decode_uint8(model: TinyDecoder, latents: torch.Tensor, *, chunk_frames: int = 4) -> np.ndarray:
    """uint8 [F, H, W, 3] frames on the CPU."""
    return np.concatenate(list(iter_uint8_chunks(model, latents, chunk_frames=chunk_frames)), axis=0)
