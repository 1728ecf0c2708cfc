"""The turbo engine: models, rCM sampler, VAE, video files.

Public entry points (imports are lazy so ``generator.engine.api`` stays light for front ends):
  * ``create_engine(settings) -> Engine`` (the worker's factory, ``generator.engine:create_engine``)
  * video helpers: ``write_mp4``, ``probe``, ``fit_to_size``, ``thumbnail``, ``output_name`` (``generator.engine.video``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generator.engine.api import Engine
    from turbobot.config import Settings

__all__ = ["create_engine", "fit_to_size", "output_name", "probe", "thumbnail", "write_mp4"]


def create_engine(settings: Settings) -> Engine:
    """The engine for these settings (device from ``engine.device``; the embedded tiny models when no
    model is configured). Nothing is loaded until ``load()`` or the first ``render``."""
    from generator.engine.runtime import TurboEngine

    return TurboEngine(settings)


def __getattr__(name: str) -> Any:
    if name in ("fit_to_size", "output_name", "probe", "thumbnail", "write_mp4"):
        from generator.engine import video

        return getattr(video, name)
    raise AttributeError(f"module 'generator.engine' has no attribute {name!r}")
