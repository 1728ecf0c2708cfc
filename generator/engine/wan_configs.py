"""``WanTransformer3DModel`` kwargs of the supported models (docs/engine.md section 2), importable without torch."""

from __future__ import annotations

from typing import Any

_SHARED: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "text_dim": 4096,
    "freq_dim": 256,
    "out_channels": 16,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
}

WAN_CONFIGS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": {
        **_SHARED,
        "num_attention_heads": 12,
        "num_layers": 30,
        "ffn_dim": 8960,
        "in_channels": 16,
    },
    "wan2.1-t2v-14b": {
        **_SHARED,
        "num_attention_heads": 40,
        "num_layers": 40,
        "ffn_dim": 13824,
        "in_channels": 16,
    },
    # One expert (high- or low-noise) of Wan2.2-I2V-A14B: 16 noise + 20 condition channels.
    "wan2.2-i2v-a14b": {
        **_SHARED,
        "num_attention_heads": 40,
        "num_layers": 40,
        "ffn_dim": 13824,
        "in_channels": 36,
    },
}

# (model dim, layers, in_channels) -> display name, used to say what a weights file is.
KNOWN_SHAPES: dict[tuple[int, int, int], str] = {
    (1536, 30, 16): "Wan2.1-T2V-1.3B",
    (5120, 40, 16): "Wan2.1-T2V-14B",
    (5120, 40, 36): "Wan2.2-I2V-A14B expert",
}


def wan_config(name: str) -> dict[str, Any]:
    """A fresh copy of a named config (keys of ``WAN_CONFIGS``)."""
    try:
        return dict(WAN_CONFIGS[name])
    except KeyError:
        raise KeyError(f"unknown Wan config {name!r}; known: {', '.join(WAN_CONFIGS)}") from None


def model_name(dim: int | None, num_layers: int | None, in_channels: int | None) -> str:
    """Display name of a DiT shape: a released model's name or 'custom Wan DiT'."""
    if dim is None or num_layers is None or in_channels is None:
        return "incomplete Wan DiT"
    return KNOWN_SHAPES.get((dim, num_layers, in_channels), "custom Wan DiT")
