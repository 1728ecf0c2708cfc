"""The chunked causal VAE decode (latent frame 0 alone, then k latent frames per pass) equals diffusers' stock
frame-by-frame decode, for the engine's tiny VAE and a real-width Wan2.1 VAE, at chunk sizes that do and do not
divide the frame count; out-of-memory passes are retried smaller; the engine's decode paths use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from generator.engine import vae as vae_ops
from generator.engine import vae_chunked
from generator.engine.tiny import tiny_vae

TOL = {"rtol": 0.0, "atol": 2e-5}


def stock(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def chunked(vae: AutoencoderKLWan, z: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list[int]]:
    parts = list(vae_chunked.iter_decoded(vae, z, chunk=chunk))
    return torch.cat(parts, dim=2), [p.shape[2] for p in parts]


@pytest.fixture(scope="module")
def tiny() -> tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]:
    vae = tiny_vae()
    z = torch.randn(1, 16, 7, 3, 4, generator=torch.Generator().manual_seed(11))
    return vae, z, stock(vae, z)


@pytest.fixture(scope="module")
def real() -> tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=96, z_dim=16).float().eval().requires_grad_(False)  # Wan2.1 widths
    z = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(12))
    ref = stock(vae, z)
    assert ref.shape == (1, 3, 21, 64, 64)
    assert (ref.abs() < 1).float().mean() > 0.9  # not saturated by the clamp: the comparison means something
    return vae, z, ref


@pytest.mark.parametrize("chunk", [1, 2, 4, 6, 9])
def test_tiny_vae_chunks_equal_stock(tiny: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor], chunk: int) -> None:
    vae, z, ref = tiny
    out, sizes = chunked(vae, z, chunk)
    t = vae.config.scale_factor_temporal
    # frame 0 alone (one pixel frame), then passes of <= chunk latent frames (t pixel frames each)
    expect = [1] + [t * min(chunk, 6 - s) for s in range(0, 6, chunk)]
    assert sizes == expect
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_real_width_vae_chunks_equal_stock(real: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor],
                                           chunk: int) -> None:
    vae, z, ref = real
    out, sizes = chunked(vae, z, chunk)
    assert sum(sizes) == 21 and sizes[0] == 1 and len(sizes) == 1 + -(-5 // chunk)
    torch.testing.assert_close(out, ref, **TOL)


def test_the_comparison_sees_a_broken_cache(tiny: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]) -> None:
    """Negative control: passes that start from a stale cache (frame 0's) differ far beyond the tolerance."""
    vae, z, ref = tiny
    vae.clear_cache()
    cache = vae._feat_map
    parts = []
    with torch.no_grad():
        x = vae.post_quant_conv(z)
        parts.append(vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True))
        after_first = list(cache)
        for i in (1, 4):  # right for the first of these passes, stale for the second
            cache[:] = after_first
            parts.append(vae.decoder(x[:, :, i : i + 3], feat_cache=cache, feat_idx=[0]))
    vae.clear_cache()
    broken = unpatchify(torch.cat(parts, dim=2), vae.config.patch_size).clamp(-1, 1)
    n_good = 1 + 3 * 4
    torch.testing.assert_close(broken[:, :, :n_good], ref[:, :, :n_good], **TOL)
    assert (broken - ref).abs().max() > 100 * TOL["atol"]


def test_out_of_memory_pass_is_retried_with_half_the_frames(
    tiny: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor],
) -> None:
    vae, z, ref = tiny
    seen: list[int] = []

    def fail_big(_m: object, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].shape[2])
        if args[0].shape[2] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    hook = vae.decoder.register_forward_pre_hook(fail_big)
    try:
        out, sizes = chunked(vae, z, 6)
        assert seen == [1, 6, 3, 2, 2, 2] and sizes == [1, 8, 8, 8]
        torch.testing.assert_close(out, ref, **TOL)
    finally:
        hook.remove()

    def fail_all(_m: object, _a: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    hook = vae.decoder.register_forward_pre_hook(fail_all)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            chunked(vae, z, 4)  # a single-frame pass that fails is the caller's problem (tiled fallback)
        assert all(c is None for c in vae._feat_map)  # cache cleared on the way out
    finally:
        hook.remove()


def test_engine_decode_paths_use_the_chunked_decode(
    tiny: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch,
) -> None:
    vae, z, ref = tiny
    mean, std = vae_ops.latent_stats(vae, torch.device("cpu"), torch.float32)
    latents = (z - mean) / std  # the engine hands over normalized latents
    monkeypatch.setattr(vae_ops, "DECODE_OPTIONS", vae_chunked.DecodeOptions(max_chunk=4, cpu_max_chunk=4))
    chunks = list(vae_ops.iter_uint8_chunks(vae, latents))
    assert [c.shape[0] for c in chunks] == [1, 16, 8]
    frames = np.concatenate(chunks, axis=0)
    ref_u8 = vae_ops.to_uint8_frames(ref)
    assert np.abs(frames.astype(int) - ref_u8.astype(int)).max() <= 1  # float rounding at a .5 boundary at most
    torch.testing.assert_close(vae_ops.decode(vae, latents), ref, rtol=0, atol=1e-4)
    # Separate float decodes: a last-bit difference may move a value across a .5 rounding boundary.
    assert np.abs(vae_ops.decode_uint8(vae, latents).astype(int) - frames.astype(int)).max() <= 1


def test_cpu_default_is_one_frame_per_pass(tiny: tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]) -> None:
    vae, z, ref = tiny
    parts = list(vae_chunked.iter_decoded(vae, z))
    assert [p.shape[2] for p in parts] == [1] + [4] * 6
    torch.testing.assert_close(torch.cat(parts, dim=2), ref, rtol=0, atol=0)  # bit-identical to diffusers


def test_chunk_plan_follows_free_memory() -> None:
    vae = AutoencoderKLWan(base_dim=96, z_dim=16)
    unit = 4 * 480 * 832 * 96 * 2  # one last-stage activation of a 480p latent frame in bf16
    plan = lambda free: vae_chunked.plan_chunk(vae, 60, 104, torch.bfloat16, max_chunk=20, free=free)  # noqa: E731
    assert plan(None) == 20  # CPU: no memory figure, the cap
    assert plan(0) == 1 and plan(20 * unit) == 1
    small, big = plan(40 * 2**30), plan(200 * 2**30)
    assert 1 < small < big == 20
    per_frame, fixed = vae_chunked._PEAK_UNITS_PER_LATENT_FRAME, vae_chunked._FIXED_UNITS
    assert small == int((0.8 * 40 * 2**30 - fixed * unit) // (per_frame * unit))


def test_channels_last_weights_are_restored() -> None:
    conv3, conv2 = torch.nn.Conv3d(4, 4, 3), torch.nn.Conv2d(4, 4, 3)
    module = torch.nn.Sequential(conv3, conv2)
    before = [(m.weight.data_ptr(), m.weight.stride()) for m in (conv3, conv2)]
    with vae_chunked.channels_last(module):
        assert conv3.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert conv2.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv3.weight.is_contiguous()
    assert [(m.weight.data_ptr(), m.weight.stride()) for m in (conv3, conv2)] == before
