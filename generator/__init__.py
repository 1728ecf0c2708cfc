"""Video generation: the request model (``request``), the engine (``engine``, ``attention``), video files
(``media``) and the scheduler with its GPU workers (``scheduler``); layers in pyproject.toml's import
contracts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generator.engine.transformer import load_transformer

__all__ = ["load_transformer"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing ``generator`` (request models, scheduler) does not import torch/diffusers.
    if name == "load_transformer":
        from generator.engine.transformer import load_transformer

        return load_transformer
    raise AttributeError(f"module 'generator' has no attribute {name!r}")
