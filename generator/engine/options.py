"""What the engine is told: ``EngineOptions`` and one ``ModelOptions`` per configured model.

Plain frozen dataclasses with paths already resolved, so the engine never reads the configuration file or
knows where relative paths start. The worker builds them from the settings
(``generator.scheduler.engine_options``); tests and benchmarks may build them directly. Imports nothing of
this project.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TINY_KINDS = ("tiny-t2v", "tiny-i2v")


@dataclass(frozen=True)
class ModelOptions:
    """One model. A path is None when the setting is empty (the embedded tiny models need none)."""

    kind: str = "tiny-t2v"  # tiny-t2v, tiny-i2v, wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-i2v-a14b
    transformer: Path | None = None  # TurboDiffusion .pth file or diffusers transformer folder
    transformer_low_noise: Path | None = None  # Wan2.2 I2V low-noise expert
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    tiny_decoder: Path | None = None  # TAEHV checkpoint; loaded when set
    quantized: str = "auto"  # auto (detect from the file), yes, no
    precision: str = "auto"  # DiT linears: auto, bf16, fp8
    decoder: str = "vae"  # the final decode unless a job says otherwise: vae or tiny
    label: str = ""  # shown to users; the model's name when empty

    @property
    def mode(self) -> str:
        return "i2v" if "i2v" in self.kind else "t2v"


def tiny_models() -> dict[str, ModelOptions]:
    """The embedded demo pair, used when no model is configured."""
    return {kind: ModelOptions(kind=kind) for kind in TINY_KINDS}


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto (cuda when available), cuda, cpu
    attention: str = "auto"  # the engine's attention when a request says "auto"
    offload: str = "auto"  # auto (by memory), none, model (idle models on the CPU)
    prompt_cache_size: int = 64  # prompt embeddings kept per text encoder
    compile: bool = True  # regional torch.compile of the DiT blocks (CUDA only)
    compile_cache_dir: Path = Path("data/compile_cache")  # compiled kernels on disk, reused across restarts
    t2v_model: str = ""  # preferred default model of each mode; "" = the first of that mode
    i2v_model: str = ""
    # The request the warm-up passes are shaped like (the configured default request).
    warm_up_resolution: str = "480p"
    warm_up_aspect: str = "16:9"
    warm_up_frames: int = 81
    models: Mapping[str, ModelOptions] = field(default_factory=tiny_models)
    lora_folder: Path | None = None  # style LoRAs (*.safetensors, name = lower-cased stem); None = none
    lora_cache_size: int = 4  # LoRA files kept loaded
    # GPUs that render one video together (Ulysses context parallelism over their process group, which the
    # caller creates and passes to the engine); 1 = a job on one device.
    gpus_per_job: int = 1

    def model_names(self, mode: str) -> tuple[str, ...]:
        """Models of ``mode`` ("t2v" / "i2v"), the preferred default first."""
        names = [n for n, m in self.models.items() if (m.mode == "i2v") == (mode == "i2v")]
        preferred = self.t2v_model if mode == "t2v" else self.i2v_model
        if preferred in names:
            names.remove(preferred)
            names.insert(0, preferred)
        return tuple(names)
