"""The worker's view of the engine: ``EngineOptions`` built from the settings, and the default engine factory.

The engine takes only its own options (``generator.engine.options``); this is where ``config.toml``'s
``[engine]``, ``[models.*]`` and ``[defaults]`` sections become them, with every path resolved against the
configuration's folder. May import the settings and the engine; nothing imports it but the worker, tests
and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from generator.engine.options import EngineOptions, ModelOptions
from turbobot.config import ModelSettings, Settings

if TYPE_CHECKING:
    from generator.engine.api import Engine


def _path(settings: Settings, value: str) -> Path | None:
    return settings.path(value) if value else None


def model_options(settings: Settings, ms: ModelSettings) -> ModelOptions:
    return ModelOptions(
        kind=ms.kind,
        transformer=_path(settings, ms.transformer),
        transformer_low_noise=_path(settings, ms.transformer_low_noise),
        vae=_path(settings, ms.vae),
        text_encoder=_path(settings, ms.text_encoder),
        tokenizer=_path(settings, ms.tokenizer),
        tiny_decoder=_path(settings, ms.tiny_decoder),
        quantized=ms.quantized,
        precision=ms.precision,
        decoder=ms.decoder,
        label=ms.label,
    )


def engine_options(settings: Settings) -> EngineOptions:
    eng, d = settings.engine, settings.defaults
    return EngineOptions(
        device=eng.device,
        attention=eng.attention,
        offload=eng.offload,
        prompt_cache_size=eng.prompt_cache_size,
        compile=eng.compile,
        compile_cache_dir=settings.path(eng.compile_cache_dir),
        t2v_model=eng.t2v_model,
        i2v_model=eng.i2v_model,
        warm_up_resolution=d.resolution,
        warm_up_aspect=d.aspect,
        warm_up_frames=d.frames,
        models={name: model_options(settings, ms) for name, ms in settings.effective_models.items()},
        lora_folder=settings.path(settings.loras.folder),
        gpus_per_job=settings.scheduler.gpus_per_job,
    )


def default_engine(settings: Settings) -> Engine:
    """The worker's default engine factory (``DEFAULT_ENGINE_FACTORY``): the turbo engine for these settings.
    Nothing is loaded until ``load()`` or the first render."""
    from generator.engine import create_engine

    return create_engine(engine_options(settings))
