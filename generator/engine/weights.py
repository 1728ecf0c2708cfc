"""Small helpers shared by the text-encoder and VAE loaders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def describe_weights(shapes: Mapping[str, Any]) -> str:
    """A short guess of what a state dict is, for error messages."""
    keys = set(shapes)
    if "decoder.middle.0.residual.0.gamma" in keys:
        return "a Wan VAE (Wan2.1_VAE.pth)"
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        return "a umT5 text encoder"
    if any(k.startswith(("blocks.0.self_attn.", "blocks.0.attn1.")) for k in keys):
        return "a Wan DiT (transformer) checkpoint"
    if "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys):
        return "a transformers T5 state dict"
    return f"an unknown model ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3])})"
