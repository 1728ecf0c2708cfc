"""The embedded demo stack: tiny Wan T2V / I2V transformers, a tiny ``AutoencoderKLWan``, a tiny
``UMT5EncoderModel`` and an in-memory byte-level tokenizer, with random weights from fixed seeds.

They are the same classes the real models use and go through exactly the same engine code; only their sizes
differ, chosen so a default job (81 frames, 832x480, 4 steps) runs in seconds on a small CPU:
  * VAE: ``patch_size`` 4 with two 2x up/down stages (16x spatial, 4x temporal, 16 latent channels), so
    the causal decoder works at a quarter of the output size;
  * DiT: patch (1, 1, 1) over those latents (32,760 tokens at 480p like the real 1.3B), 1 block of width 16;
  * tiny decoder (the fast TAEHV-layout one): widths 8/8/4/4 with pixel shuffle 2, so it also gives 16x;
  * umT5: 2 layers of width 32 over a 259-symbol byte vocabulary (every prompt tokenizes distinctly).
Their videos are not meaningful: every result is labelled as coming from an untrained demo model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from generator.engine.offline import ensure_offline

ensure_offline()

import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel  # noqa: E402

from generator.engine.text import umt5_config  # noqa: E402

if TYPE_CHECKING:
    from generator.engine.taehv import TinyDecoder

TINY_KINDS = ("tiny-t2v", "tiny-i2v")
TINY_TEXT_DIM = 32
DEMO_NOTE = "untrained demo model"
_SEEDS = {"text": 1001, "vae": 1002, "tiny-t2v": 1003, "tiny-i2v": 1004, "taehv": 1005}
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5

TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 2,
    "z_dim": 16,
    "dim_mult": [1, 1, 1],
    "num_res_blocks": 0,
    "attn_scales": [],
    "temperal_downsample": [True, True],
    "patch_size": 4,
    "in_channels": 3 * 4 * 4,
    "out_channels": 3 * 4 * 4,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
}

_TINY_DIT: dict[str, Any] = {
    "patch_size": (1, 1, 1),
    "num_attention_heads": 1,
    "attention_head_dim": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 1,
    "out_channels": 16,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}


def is_tiny(kind: str) -> bool:
    return kind in TINY_KINDS


def tiny_transformer_config(kind: str) -> dict[str, Any]:
    """``WanTransformer3DModel`` kwargs of a tiny model: 16 latent channels for T2V, 16 + 4 + 16 for I2V."""
    if kind not in TINY_KINDS:
        raise ValueError(f"not a tiny model kind: {kind!r}")
    return {**_TINY_DIT, "in_channels": 36 if kind == "tiny-i2v" else 16}


def tiny_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (no merges) that appends ``</s>`` like umT5, built in memory."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length,
    )


def tiny_text_encoder() -> UMT5EncoderModel:
    cfg = umt5_config(vocab=len(SPECIAL_TOKENS) + 256, dim=TINY_TEXT_DIM, dim_attn=TINY_TEXT_DIM, dim_ffn=64,
                      buckets=32, heads=4, layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["text"])
        model = UMT5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def tiny_vae() -> AutoencoderKLWan:
    """Random weights, except that the decoder's output conv is shared by the 4x4 pixels of each patch:
    a random per-pixel output would be pure high-frequency noise, which makes 10+ MB mp4s that encode slowly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["vae"])
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    p = int(TINY_VAE_CONFIG["patch_size"]) ** 2
    conv = vae.decoder.conv_out
    with torch.no_grad():  # unpatchify reads channel c * p + k as sub-pixel k of colour c
        w = conv.weight.view(3, p, *conv.weight.shape[1:])
        w.copy_(w[:, :1].expand_as(w).clone())
        bias = conv.bias.view(3, p)
        bias.copy_(bias[:, :1].expand_as(bias).clone())
    return vae.eval().requires_grad_(False)


TINY_TAEHV_WIDTHS = (8, 8, 4, 4)
TINY_TAEHV_PATCH = 2  # x8 from the three upsamples, x2 from the pixel shuffle: the tiny VAE's 16x


def tiny_taehv_decoder() -> TinyDecoder:
    """A TAEHV-layout decoder with random weights for the demo VAE's latents (16 channels, 16x, 4x time);
    its output conv is shared by the 2x2 pixels of each patch, like ``tiny_vae``'s, to keep mp4s small."""
    from generator.engine.taehv import WAN21_LATENT_CHANNELS, TinyDecoder, TinySpec

    n = TINY_TAEHV_WIDTHS
    spec = TinySpec(latent_channels=WAN21_LATENT_CHANNELS, widths=n,
                    memblocks=tuple(((w, w),) * 3 for w in n[:3]), strides=(1, 2, 2), file_strides=(1, 2, 2),
                    patch=TINY_TAEHV_PATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["taehv"])
        model = TinyDecoder(spec)
    p = TINY_TAEHV_PATCH**2
    conv = model.decoder[22]
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
    with torch.no_grad():  # pixel_shuffle reads channel c * p + k as sub-pixel k of colour c
        w = conv.weight.view(3, p, *conv.weight.shape[1:])
        w.copy_(w[:, :1].expand_as(w).clone())
        bias = conv.bias.view(3, p)
        bias.copy_(bias[:, :1].expand_as(bias).clone() + 0.5)  # mid-grey, not a mostly black clip
    return model.eval().requires_grad_(False)


def tiny_transformers(kind: str, *, attention: str = "auto", sla_topk: float = 0.1) -> list[torch.nn.Module]:
    """[model] for tiny-t2v, [high-noise, low-noise] for tiny-i2v, on the CPU in float32 (move them after)."""
    from generator.engine.transformer import build_transformer

    cfg = tiny_transformer_config(kind)
    experts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS[kind])
        for _ in range(2 if kind == "tiny-i2v" else 1):
            experts.append(build_transformer(cfg, attention=attention, sla_topk=sla_topk, device="cpu",
                                             dtype=torch.float32))
    return experts
