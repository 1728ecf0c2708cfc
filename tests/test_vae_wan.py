"""Wan2.1 VAE: the original ``Wan2.1_VAE.pth`` layout loads into diffusers' AutoencoderKLWan with every key in
its slot; our decode equals diffusers' decode; encode gives the normalized posterior mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from engine_synth import wan_vae_shapes

from generator.engine import vae as vae_ops
from generator.engine.api import CheckpointError

TINY = {"dim": 4, "z": 16, "dim_mult": [1, 2, 2, 2], "nrb": 1, "temporal": [True, False, True]}


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(*shape, generator=g) * 0.2 for k, shape in wan_vae_shapes(**TINY).items()}
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    return path, sd


def test_config_is_inferred_from_the_file(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    cfg = vae_ops.wan_vae_config({k: tuple(v.shape) for k, v in vae_file[1].items()})
    assert cfg["base_dim"] == 4 and cfg["z_dim"] == 16 and cfg["dim_mult"] == [1, 2, 2, 2]
    assert cfg["num_res_blocks"] == 1 and cfg["temperal_downsample"] == [True, False, True]
    assert (cfg["scale_factor_spatial"], cfg["scale_factor_temporal"]) == (8, 4)


def test_every_original_key_lands_in_its_slot(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = vae_file
    vae = vae_ops.load_vae(path)
    # decoder.upsamples: stage 0 = 0,1 + resample 2 (3d); stage 1 = 3 (4->8, shortcut),4 + resample 5 (2d);
    # stage 2 = 6 (4->8),7 + resample 8 (3d); stage 3 = 9,10. encoder.downsamples: 0, resample 1 (3d),
    # 2 (4->8, shortcut), resample 3 (2d), 4, resample 5 (3d), 6.
    dec, enc = vae.decoder, vae.encoder
    pairs = {
        "decoder.upsamples.3.shortcut.weight": dec.up_blocks[1].resnets[0].conv_shortcut.weight,
        "decoder.upsamples.4.residual.2.weight": dec.up_blocks[1].resnets[1].conv1.weight,
        "decoder.upsamples.7.residual.6.weight": dec.up_blocks[2].resnets[1].conv2.weight,
        "decoder.upsamples.7.residual.3.gamma": dec.up_blocks[2].resnets[1].norm2.gamma,
        "decoder.upsamples.10.residual.0.gamma": dec.up_blocks[3].resnets[1].norm1.gamma,
        "decoder.upsamples.5.resample.1.weight": dec.up_blocks[1].upsamplers[0].resample[1].weight,
        "decoder.upsamples.2.time_conv.weight": dec.up_blocks[0].upsamplers[0].time_conv.weight,
        "decoder.upsamples.8.time_conv.bias": dec.up_blocks[2].upsamplers[0].time_conv.bias,
        "decoder.middle.1.to_qkv.weight": dec.mid_block.attentions[0].to_qkv.weight,
        "decoder.middle.2.residual.0.gamma": dec.mid_block.resnets[1].norm1.gamma,
        "decoder.head.2.weight": dec.conv_out.weight,
        "decoder.conv1.bias": dec.conv_in.bias,
        "encoder.downsamples.1.time_conv.weight": enc.down_blocks[1].time_conv.weight,
        "encoder.downsamples.2.shortcut.bias": enc.down_blocks[2].conv_shortcut.bias,
        "encoder.downsamples.3.resample.1.weight": enc.down_blocks[3].resample[1].weight,
        "encoder.downsamples.5.time_conv.weight": enc.down_blocks[5].time_conv.weight,
        "encoder.head.0.gamma": enc.norm_out.gamma,
        "conv1.weight": vae.quant_conv.weight,
        "conv2.bias": vae.post_quant_conv.bias,
    }
    for key, param in pairs.items():
        torch.testing.assert_close(param, sd[key], rtol=0, atol=0, msg=key)
    assert len(list(vae.parameters())) == len(sd)
    loaded = sorted(float(p.double().sum()) for p in vae.parameters())
    assert loaded == pytest.approx(sorted(float(t.double().sum()) for t in sd.values()), rel=1e-9, abs=1e-9)


def test_released_wan21_shape_maps_onto_diffusers_defaults() -> None:
    shapes = wan_vae_shapes(96, 16, [1, 2, 4, 4], 2, [False, True, True])
    cfg = vae_ops.wan_vae_config(shapes)
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    mapping = vae_ops.wan_vae_mapping(list(shapes), cfg)
    assert set(mapping) == set(expected)
    assert all(shapes[src] == expected[dst] for dst, src in mapping.items())
    assert cfg["dim_mult"] == [1, 2, 4, 4] and cfg["temperal_downsample"] == [False, True, True]


def test_wrong_files_get_clear_errors(tmp_path: Path, vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    t5 = tmp_path / "t5.pth"
    torch.save({"token_embedding.weight": torch.ones(4, 2), "blocks.0.attn.q.weight": torch.ones(2, 2)}, t5)
    with pytest.raises(CheckpointError, match=r"not a Wan2\.1 VAE.*umT5"):
        vae_ops.load_vae(t5)
    sd = dict(vae_file[1])
    sd["decoder.upsamples.99.residual.0.gamma"] = torch.ones(4, 1, 1, 1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"upsamples\.99"):
        vae_ops.load_vae(tmp_path / "extra.pth")
    notdict = tmp_path / "list.pth"
    torch.save([torch.ones(2)], notdict)
    with pytest.raises(CheckpointError, match="not a state dict"):
        vae_ops.load_vae(notdict)


def test_our_decode_equals_diffusers_decode(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    vae = vae_ops.load_vae(vae_file[0])
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    ours = vae_ops.decode(vae, latents)
    mean, std = vae_ops.latent_stats(vae, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ref = vae.decode(latents * std + mean).sample
    assert ours.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    frames = vae_ops.decode_uint8(vae, latents)
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 48, 3)
    # The float decodes agree to 1e-5 (above); rounding to uint8 can split them by one step at a .5 boundary.
    assert np.abs(frames.astype(int) - vae_ops.to_uint8_frames(ref).astype(int)).max() <= 1


def test_tiled_decode_fallback_runs() -> None:
    from generator.engine.tiny import tiny_vae

    vae = tiny_vae()
    latents = torch.randn(1, 16, 2, 20, 20, generator=torch.Generator().manual_seed(2))  # 320 px > 256 tiles
    full = vae_ops.decode(vae, latents)
    tiled = vae_ops.decode(vae, latents, tiled=True)
    assert tiled.shape == full.shape == (1, 3, 5, 320, 320)
    assert not vae.use_tiling  # switched off again
    assert (tiled - full).abs().mean() < 0.2  # blended tiles, not garbage


def test_encode_gives_normalized_posterior_mean(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    vae = vae_ops.load_vae(vae_file[0])
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = vae_ops.encode_mean(vae, video)
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert got.shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(got, (mu - mean) / std)
