"""The turbo engine: models, rCM sampler, VAE; one ``Engine`` per worker process.

Entry point: ``create_engine(options) -> Engine`` with ``generator.engine.options.EngineOptions`` (the worker
builds them from the settings in ``generator.scheduler.engine_options``). The import is lazy so that
``generator.engine.api`` stays light. The engine and ``generator.attention`` import nothing of ``bots``,
``generator.scheduler``, ``storage`` or ``turbobot``; they may use ``generator.request`` and
``generator.media`` (mp4 files). Design notes: ``docs/engine.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generator.engine.api import Engine
    from generator.engine.options import EngineOptions

__all__ = ["create_engine"]


def create_engine(options: EngineOptions, *, group: Any = None) -> Engine:
    """The engine for these options (device from ``options.device``; the embedded tiny models when no
    model is configured). Nothing is loaded until ``load()`` or the first ``render``. ``group``: the
    ``torch.distributed`` process group of ``options.gpus_per_job`` ranks when that is more than 1."""
    from generator.engine.runtime import TurboEngine

    return TurboEngine(options, group=group)
