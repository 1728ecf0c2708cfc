"""``TurboEngine``: the ``Engine`` the scheduler's worker drives (see ``generator/engine/api.py``).

One engine per worker process. Models are loaded once and kept (resident on the GPU when they fit, else
moved in per stage), prompt embeddings are cached, and a job is: text embedding -> (I2V: image latent) ->
rCM denoise with progress and cancellation between steps -> one VAE decode -> H.264 mp4.
The embedded tiny models (no weights configured) take exactly this path. Configured by ``EngineOptions``
only; writes mp4 files through ``generator.media``; imports nothing of the front ends, scheduler, storage or
settings (docs/engine.md section 1).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.engine.offline import ensure_offline

ensure_offline()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from generator import media  # noqa: E402
from generator.engine import i2v, rcm, taehv, tiny  # noqa: E402
from generator.engine import lora as lora_ops  # noqa: E402
from generator.engine import preview as preview_ops  # noqa: E402
from generator.engine import vae as vae_ops  # noqa: E402
from generator.engine.api import (  # noqa: E402
    CheckpointError,
    EngineError,
    JobCancelled,
    ModelNotConfigured,
    OutOfMemory,
    Progress,
    RenderJob,
    RenderResult,
)
from generator.engine.fp8 import Fp8Linear  # noqa: E402
from generator.engine.options import EngineOptions, ModelOptions  # noqa: E402
from generator.engine.text import TextEncoder, load_text_encoder, load_tokenizer  # noqa: E402
from generator.request import GenerationRequest  # noqa: E402

if TYPE_CHECKING:  # diffusers' classes are Any to the type checker (see pyproject's mypy overrides)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from generator.engine.context_parallel import ContextParallel

log = logging.getLogger("turbobot.engine")

OOM_TEXT = (
    "The GPU ran out of memory making this video, even after freeing memory and decoding in tiles. "
    "Try 480p, fewer frames, or a smaller model."
)
RECOMPILE_LIMIT = 64  # compiled variants of the block code kept before dynamo falls back to eager
WEIGHT_BUDGET = 0.70  # share of GPU memory that resident weights may take; the rest is for activations


def resolve_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("engine.device is 'cuda' but no CUDA GPU is visible.", code="no_gpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def dit_param_bytes(config: dict[str, Any], precision: str = "bf16") -> int:
    """Approximate weight bytes of a Wan DiT from its config: the block linears (attention + FFN, almost all of
    it) at 1 byte a weight in fp8 or 2 in bf16; per-channel scales and biases are noise at these sizes."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    per_block = 8 * d * d + 2 * d * int(config["ffn_dim"])
    return int(config["num_layers"]) * per_block * (1 if precision == "fp8" else 2)


def _path_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    return 0


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass
class Bundle:
    """One configured model, loaded: its transformer expert(s) and the keys of its text encoder and VAE."""

    name: str
    kind: str
    mode: str
    label: str
    is_demo: bool
    experts: list[WanTransformer3DModel]
    text_key: str
    vae_key: str
    dtype: torch.dtype
    offload_text: bool = False  # text encoder lives on the CPU between encodes
    offload_dit: bool = False  # only the running expert is on the GPU; all leave it before the decode
    precision: str = "bf16"  # of the DiT's block linears: "bf16" or "fp8"
    info: dict[str, Any] = field(default_factory=dict)
    decoder: str = "vae"  # the final decode unless a job says otherwise: "vae" or "tiny"
    tiny_key: str | None = None  # its tiny (TAEHV) decoder in ``TurboEngine._tinies``, when it has one


class TurboEngine:
    """Implements ``generator.engine.api.Engine``."""

    def __init__(self, options: EngineOptions, *, device: str | torch.device | None = None,
                 group: Any = None) -> None:
        self.options = options
        # Context parallelism: the DiT steps of every job run over ``group`` (every rank renders the same
        # job; only the leader decodes), see ``generator.engine.context_parallel``.
        self.cp: ContextParallel | None = None
        if options.gpus_per_job > 1 or group is not None:
            self.cp = _context_parallel(options.gpus_per_job, group)
        self.models: dict[str, ModelOptions] = dict(options.models)
        self.device = torch.device(device) if device is not None else resolve_device(options.device)
        self._texts: dict[str, TextEncoder] = {}
        self._vaes: dict[str, AutoencoderKLWan] = {}
        self._tinies: dict[str, taehv.TinyDecoder] = {}
        self._bundles: dict[str, Bundle] = {}
        self._lock = threading.RLock()
        self.last_attention: str | None = None
        self._lora_cache = lora_ops.LoraCache(options.lora_cache_size)
        self.lora_status: dict[str, str] = {}  # name -> "" (usable) or why it is not, from the start-up check

    # --- Engine protocol ----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, object]:
        models = {}
        for name, ms in self.models.items():
            b = self._bundles.get(name)
            models[name] = {
                "kind": ms.kind,
                "label": self._label(name, ms),
                "demo": tiny.is_tiny(ms.kind),
                "loaded": b is not None,
                "decoder": b.decoder if b else ms.decoder,
                "tiny_decoder": b.tiny_key is not None if b else bool(ms.tiny_decoder) or tiny.is_tiny(ms.kind),
                **({"offload_text": b.offload_text, "offload_dit": b.offload_dit, "precision": b.precision}
                   if b else {}),
            }
        out: dict[str, object] = {
            "engine": "turbo",
            "device": str(self.device),
            "attention": self.options.attention,
            "offload": self.options.offload,
            "models": models,
            "default_t2v": self.default_model("t2v"),
            "default_i2v": self.default_model("i2v"),
            "demo": all(tiny.is_tiny(m.kind) for m in self.models.values()),
            "loras": dict(self.lora_status),
            "gpus_per_job": self.cp.size if self.cp else 1,
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            out["gpu"] = props.name
            out["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            out["gpu_allocated_gb"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 2)
        return out

    def load(self) -> None:
        """Build / load the default model of each mode (on a GPU with real weights: the first only)."""
        names = [n for n in (self.default_model("t2v"), self.default_model("i2v")) if n]
        real = [n for n in names if not tiny.is_tiny(self.models[n].kind)]
        if self.device.type == "cuda" and len(real) > 1:
            names = [n for n in names if n not in real[1:]]
        for name in names:
            self._bundle(name)
        self.check_loras()

    def check_loras(self) -> dict[str, str]:
        """Read every LoRA file of the folder and check it against the loaded models: a bad file is logged and
        listed as unavailable (with the reason) instead of failing the worker."""
        status: dict[str, str] = {}
        folder = self.options.lora_folder
        for name, path in (lora_ops.discover(folder) if folder else {}).items():
            try:
                lora = self._lora_cache.get(path, name)
                problems = []
                for b in self._bundles.values():
                    try:
                        lora_ops.check_lora(lora, b.experts[0], b.label)
                        break
                    except lora_ops.LoraError as e:
                        problems.append(e.user_message)
                else:
                    if problems:
                        raise lora_ops.LoraError(problems[0])
                status[name] = ""
            except lora_ops.LoraError as e:
                status[name] = e.user_message
                log.warning("LoRA %s is unavailable: %s", name, e.user_message)
        self.lora_status = status
        return status

    def _job_loras(self, req: GenerationRequest, b: Bundle) -> list[tuple[lora_ops.LoraFile, float]]:
        from generator.params import parse_loras

        chosen = parse_loras(req.loras) if req.loras else []
        if not chosen:
            return []
        files = lora_ops.discover(self.options.lora_folder) if self.options.lora_folder else {}
        out = []
        for name, scale in chosen:
            if name not in files:
                raise lora_ops.LoraError(f"The LoRA style '{name}' is not on this server (any more).")
            lora = self._lora_cache.get(files[name], name)
            for m in b.experts:
                lora_ops.check_lora(lora, m, b.label)
            out.append((lora, scale))
        return out

    def render(
        self,
        job: RenderJob,
        *,
        progress: Callable[[Progress], None],
        cancelled: Callable[[], bool],
    ) -> RenderResult:
        with self._lock:
            failed_oom = False
            try:
                result = self._render(job, progress, cancelled)
                assert result is not None
                return result
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc):
                    raise
                failed_oom = True
            if failed_oom:  # outside the except block so the failed frames (and their tensors) are gone
                self.free_memory()
                raise OutOfMemory(OOM_TEXT)
            raise AssertionError("unreachable")

    def follow(self, job: RenderJob) -> None:
        """A follower rank's part of a context-parallel job the leader renders: the same steps up to and
        including the denoise (each DiT step over the group), cancelled when the leader cancels; no decode."""
        if self.cp is None or self.cp.is_leader:
            raise EngineError("follow() is for the follower ranks of a context-parallel group")
        with self._lock:
            self._render(job, lambda _p: None, lambda: False, decode=False)

    # --- models -------------------------------------------------------------------------------------
    def default_model(self, mode: str) -> str | None:
        names = self.options.model_names(mode)
        return names[0] if names else None

    def _label(self, name: str, ms: ModelOptions) -> str:
        base = ms.label or name
        return f"{base} ({tiny.DEMO_NOTE})" if tiny.is_tiny(ms.kind) else base

    def _dtype(self, kind: str) -> torch.dtype:
        if tiny.is_tiny(kind):
            return torch.float32
        return torch.bfloat16

    def _bundle(self, name: str) -> Bundle:
        b = self._bundles.get(name)
        if b is not None:
            return b
        ms = self.models.get(name)
        if ms is None:
            raise ModelNotConfigured(f"Model '{name}' is not configured on this server.")
        t0 = time.perf_counter()
        if self.device.type == "cuda" and not tiny.is_tiny(ms.kind):
            self._evict_real_models(keep=name)
        b = self._build_tiny(name, ms) if tiny.is_tiny(ms.kind) else self._load_real(name, ms)
        if self.cp is not None:  # refused at load, not in a user's job
            for m in b.experts:
                self.cp.check_model(m, f"Model '{name}'")
        self._bundles[name] = b
        log.info("model %s (%s) ready on %s in %.1fs (%s, offload text=%s dit=%s)", name, ms.kind, self.device,
                 time.perf_counter() - t0, b.precision, b.offload_text, b.offload_dit)
        return b

    def adopt(self, name: str, *, experts: list[WanTransformer3DModel], text_encoder: nn.Module, tokenizer: Any,
              vae: AutoencoderKLWan, mode: str = "t2v", label: str = "", is_demo: bool = False) -> Bundle:
        """Register components built elsewhere (benchmarks with random weights at real sizes) under ``name``,
        which must be a configured model; they then render through the normal path."""
        ms = self.models.get(name)
        if ms is None:
            raise ModelNotConfigured(f"Model '{name}' is not configured on this server.")
        key = f"adopted:{name}"
        self._texts[key] = TextEncoder(text_encoder, tokenizer, cache_size=self.options.prompt_cache_size)
        self._vaes[key] = vae
        dtype = next(p.dtype for p in experts[0].parameters() if p.dtype != torch.float32) \
            if any(p.dtype != torch.float32 for p in experts[0].parameters()) else torch.float32
        b = Bundle(name=name, kind=ms.kind, mode=mode, label=label or self._label(name, ms), is_demo=is_demo,
                   experts=experts, text_key=key, vae_key=key, dtype=dtype, info={"transformer": "adopted"},
                   precision=getattr(experts[0], "turbo_precision", "bf16"))
        self._bundles[name] = b
        return b

    def _evict_real_models(self, keep: str) -> None:
        """One set of real transformers per GPU: drop the others (reloaded from disk when asked for)."""
        for other in [n for n, b in self._bundles.items() if n != keep and not b.is_demo]:
            del self._bundles[other]
        self.free_memory()

    def _build_tiny(self, name: str, ms: ModelOptions) -> Bundle:
        attention = self.options.attention
        if "tiny" not in self._texts:
            self._texts["tiny"] = TextEncoder(tiny.tiny_text_encoder().to(self.device), tiny.tiny_tokenizer(),
                                              cache_size=self.options.prompt_cache_size)
        if "tiny" not in self._vaes:
            self._vaes["tiny"] = tiny.tiny_vae().to(self.device)
        if "tiny" not in self._tinies:
            self._tinies["tiny"] = tiny.tiny_taehv_decoder().to(self.device)
        experts = [m.to(self.device) for m in tiny.tiny_transformers(ms.kind, attention=attention)]
        return Bundle(name=name, kind=ms.kind, mode="i2v" if ms.kind == "tiny-i2v" else "t2v",
                      label=self._label(name, ms), is_demo=True, experts=experts, text_key="tiny",
                      vae_key="tiny", dtype=torch.float32,
                      info={"transformer": "embedded tiny (random weights)"}, decoder=ms.decoder, tiny_key="tiny")

    def precision_for(self, name: str, ms: ModelOptions) -> str:
        """The model's ``precision`` setting resolved for this device; a card that cannot do what was forced is
        a configuration error naming the card and the setting (raised at load, i.e. worker start)."""
        from generator.engine.fp8 import resolve_precision

        try:
            return resolve_precision(ms.precision, self.device)
        except ValueError as exc:
            raise EngineError(f"models.{name}: {exc}", code="precision_unsupported") from None

    def _load_real(self, name: str, ms: ModelOptions) -> Bundle:
        from generator.engine.transformer import load_transformer
        from generator.engine.wan_configs import wan_config

        if ms.decoder == "tiny" and not ms.tiny_decoder:
            raise ModelNotConfigured(f"models.{name}.decoder is 'tiny' but models.{name}.tiny_decoder names no "
                                     "file; set it to a local taew2_1.pth or use decoder = 'vae'.")
        config = wan_config(ms.kind)
        dtype = self._dtype(ms.kind)
        precision = self.precision_for(name, ms)
        mode = "i2v" if "i2v" in ms.kind else "t2v"
        paths = [_required(name, "transformer", ms.transformer)]
        if ms.kind == "wan2.2-i2v-a14b":
            paths.append(_required(name, "transformer_low_noise", ms.transformer_low_noise))
        text_path = _required(name, "text_encoder", ms.text_encoder)
        tok_path = ms.tokenizer
        text_key = f"{text_path}|{tok_path}"
        vae_key = str(_required(name, "vae", ms.vae))
        offload_text, offload_dit = self._plan_offload(config, len(paths), text_path, text_key, precision)
        cpu = torch.device("cpu")
        quantized = {"yes": True, "no": False}.get(ms.quantized)
        attention = self.options.attention
        experts = []
        for p in paths:
            where = cpu if offload_dit else self.device
            experts.append(load_transformer(p, config=config, attention=attention, device=where,
                                            dtype=dtype, quantized=quantized, precision=precision))
            if self.compiling:
                self._compile(experts[-1])
        if text_key not in self._texts:
            if tok_path is None:
                raise ModelNotConfigured(f"models.{name}.tokenizer must name a local umT5 tokenizer folder.")
            enc = load_text_encoder(text_path, device=cpu if offload_text else self.device, dtype=dtype)
            self._texts[text_key] = TextEncoder(enc, load_tokenizer(tok_path),
                                                cache_size=self.options.prompt_cache_size)
        if vae_key not in self._vaes:
            vae_dtype = dtype if self.device.type == "cuda" else torch.float32
            self._vaes[vae_key] = vae_ops.load_vae(vae_key, device=self.device, dtype=vae_dtype)
        info: dict[str, Any] = {"transformer": [str(getattr(m, "turbo_checkpoint", "")) for m in experts]}
        tiny_key = self._load_tiny_decoder(ms, self._vaes[vae_key]) if ms.tiny_decoder else None
        if tiny_key:
            info["tiny_decoder"] = tiny_key
        return Bundle(name=name, kind=ms.kind, mode=mode, label=self._label(name, ms), is_demo=False,
                      experts=experts, text_key=text_key, vae_key=vae_key, dtype=dtype,
                      offload_text=offload_text, offload_dit=offload_dit, info=info, precision=precision,
                      decoder=ms.decoder, tiny_key=tiny_key)

    def _load_tiny_decoder(self, ms: ModelOptions, vae: nn.Module) -> str:
        """Load the model's TAEHV decoder (kept with the full VAE, which I2V still needs to encode images);
        refused when it would not give the full VAE's frame count and size."""
        assert ms.tiny_decoder is not None
        key = str(ms.tiny_decoder)
        if key not in self._tinies:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            model = taehv.load_tiny_decoder(key, device=self.device, dtype=dtype)
            if model.factors() != vae_ops.factors(vae):
                raise CheckpointError(
                    f"Tiny decoder {key} upsamples {model.factors()} (time, space) but the model's VAE "
                    f"{vae_ops.factors(vae)}; it is not a tiny decoder for this VAE"
                )
            self._tinies[key] = model
        return key

    def resolve_decoder(self, name: str, which: str | None = None) -> str:
        """The decoder a job on model ``name`` uses: ``which`` ("vae" / "tiny") or, when None, the model's
        setting. Asking for the tiny decoder on a model without one is an error, never a silent fallback."""
        b = self._bundle(name)
        choice = which or b.decoder
        if choice not in ("vae", "tiny"):
            raise EngineError(f"Unknown decoder {choice!r}; use 'vae' or 'tiny'.", code="bad_request")
        if choice == "tiny" and b.tiny_key is None:
            raise EngineError(
                f"Model '{name}' has no fast (tiny) decoder configured, so it cannot make a fast draft; "
                "ask without it or pick another model.", code="tiny_decoder_unavailable",
            )
        return choice

    def decode_with(self, name: str, latents: torch.Tensor, which: str | None = None) -> Any:
        """Normalized latents [1, z, T, h, w] of model ``name`` -> uint8 frames [F, H, W, 3] (numpy) through
        the chosen decoder (see ``resolve_decoder``)."""
        with self._lock:
            choice = self.resolve_decoder(name, which)
            b = self._bundles[name]
            vae = self._vaes[b.vae_key]
            if choice == "tiny":
                assert b.tiny_key is not None
                return taehv.decode_uint8(self._tinies[b.tiny_key], self._denormalize(vae, latents))
            return vae_ops.decode_uint8(vae, latents)

    def _preview(self, b: Bundle, vae: nn.Module, x0: torch.Tensor) -> Any:
        """A few small uint8 frames of the estimate ``x0`` (normalized latents): on a GPU the model's tiny
        decoder when it has one, else (and always on the CPU, where even the tiny decoder would cost a job
        several percent per preview: bench/preview_overhead.py) the linear projection. A failed preview is
        logged and skipped, never the job's end."""
        try:
            if b.tiny_key is not None and self.device.type == "cuda":
                return preview_ops.tiny_preview(self._tinies[b.tiny_key], self._denormalize(vae, x0))
            return preview_ops.linear_preview(x0, spatial_factor=vae_ops.factors(vae)[1])
        except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as exc:
            if is_oom(exc):
                self.free_memory()
            log.warning("preview skipped: %s", exc)
            return None

    @staticmethod
    def _denormalize(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """What the tiny decoder takes: the latents as the full VAE's decoder sees them (z * std + mean)."""
        mean, std = vae_ops.latent_stats(vae, latents.device, torch.float32)
        return latents.float() * std + mean

    def _plan_offload(self, config: dict[str, Any], n_experts: int, text_path: Path, text_key: str,
                      precision: str = "bf16") -> tuple[bool, bool]:
        policy = self.options.offload
        if self.device.type != "cuda" or policy == "none":
            return False, False
        if policy == "model":
            return True, True
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = WEIGHT_BUDGET * total
        dit = dit_param_bytes(config, precision) * n_experts
        text = 0 if text_key in self._texts else _path_bytes(text_path)
        vae = 256 * 2**20
        if text + dit + vae <= budget:
            return False, False
        if dit + vae <= budget:
            return True, False
        return True, True

    # --- compile and warm-up ------------------------------------------------------------------------
    @property
    def compiling(self) -> bool:
        return self.options.compile and self.device.type == "cuda"

    def _compile(self, model: WanTransformer3DModel) -> None:
        """Regional compile of the repeated DiT blocks, with the compiler's caches in the configured folder
        (set before the first compile, so a restarted worker reuses the kernels of the last one)."""
        cache = self.options.compile_cache_dir
        try:
            cache.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
            os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        except OSError as exc:  # no cache is slower to start, not wrong
            log.warning("compile cache %s unusable (%s); compiling without it", cache, exc)
        # One block code serves static + dynamic shapes, each with and without an fp8 LoRA branch per rank
        # bucket (and per expert of a two-expert model); past the default limit of 8 dynamo silently falls
        # back to eager for the rest of the process.
        dyn = torch._dynamo.config
        dyn.recompile_limit = max(int(dyn.recompile_limit), RECOMPILE_LIMIT)
        try:
            model.compile_repeated_blocks(fullgraph=False)
            model.turbo_compiled = True
        except Exception as exc:  # compile is an optimisation only
            log.warning("regional compile unavailable (%s); running eager", exc)

    def warm_up_shapes(self) -> list[tuple[int, int, int]]:
        """Pixel (width, height, frames) of the warm-up passes: the configured default request first (it
        gets kernels specialised for it), then a second size so the compiler makes the token count
        dynamic and no other resolution, aspect or frame count recompiles during a job."""
        from generator.request import ASPECTS, SIZES

        o = self.options
        first = (*SIZES[(o.warm_up_resolution, o.warm_up_aspect)], o.warm_up_frames)
        other = next(SIZES[("480p", a)] for a in ASPECTS if SIZES[("480p", a)] != first[:2])
        second = (*other, max(5, o.warm_up_frames - 16))
        return [first, second]

    def warm_up(self) -> None:
        """Run every compiled transformer once per warm-up shape (random inputs), so compile and kernel tuning
        happen now, before the worker reports ready, and not in a user's first job. On fp8 experts each
        usable LoRA whose side-branch shape is new runs once more: its branch is a compiled variant too."""
        for name, b in self._bundles.items():
            if b.is_demo or not any(getattr(m, "turbo_compiled", False) for m in b.experts):
                continue
            t0 = time.perf_counter()
            shapes = self.warm_up_shapes()
            for shape in shapes:
                self._warm_pass(b, *shape)
            variants = self._lora_variants(b)
            for lora in variants:
                applied = [lora_ops.apply_loras(m, [(lora, 1.0)]) for m in b.experts]
                try:
                    self._warm_pass(b, *shapes[0])
                finally:
                    for a in applied:
                        a.restore()
            torch.cuda.synchronize(self.device)
            log.info("model %s warmed up in %.1fs (%d LoRA branch variant(s))", name, time.perf_counter() - t0,
                     len(variants))
        self.free_memory()

    def _warm_pass(self, b: Bundle, width: int, height: int, frames: int) -> None:
        text_dim = int(b.experts[0].config.text_dim)
        for i, model in enumerate(b.experts):
            cfg = model.config
            lat = (1, int(cfg.in_channels), 1 + (frames - 1) // 4, height // 8, width // 8)
            x = torch.randn(lat, device=self.device, dtype=b.dtype)
            emb = torch.randn(1, 512, text_dim, device=self.device, dtype=b.dtype)
            ts = torch.tensor([900.0], device=self.device, dtype=b.dtype)
            with torch.no_grad():
                self._forward(b, i, x[:, : cfg.out_channels], ts, emb,
                              x[:, cfg.out_channels:] if cfg.in_channels > cfg.out_channels else None)
            del x, emb

    def _lora_variants(self, b: Bundle) -> list[lora_ops.LoraFile]:
        """One usable LoRA per distinct fp8 side-branch signature for ``b`` ([] for bf16 experts: fused LoRAs
        change no shape, so they need no compile)."""
        if not any(isinstance(mod, Fp8Linear) for mod in b.experts[0].modules()):
            return []
        files = lora_ops.discover(self.options.lora_folder) if self.options.lora_folder else {}
        seen: set[tuple[int, frozenset[str]]] = set()
        out = []
        for name, why in sorted(self.lora_status.items()):
            if why or name not in files:
                continue
            try:
                lora = self._lora_cache.get(files[name], name)
                lora_ops.check_lora(lora, b.experts[0], b.label)
            except lora_ops.LoraError:
                continue  # a LoRA for the other model
            sig = lora_ops.branch_signature([lora])
            if sig not in seen:
                seen.add(sig)
                out.append(lora)
        return out

    # --- memory -------------------------------------------------------------------------------------
    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _place(self, module: nn.Module, on_device: bool) -> None:
        target = self.device if on_device else torch.device("cpu")
        if module_device(module) != target:
            module.to(target)
            if not on_device:
                self.free_memory()

    def _offload_idle(self, b: Bundle, keep: int | None) -> None:
        """After an OOM: from now on keep the text encoder and the idle experts of ``b`` off the GPU."""
        b.offload_text = True
        self._place(self._texts[b.text_key].model, False)
        if len(b.experts) > 1:
            b.offload_dit = True
            for i, m in enumerate(b.experts):
                if i != keep:
                    self._place(m, False)
        self.free_memory()

    # --- rendering ----------------------------------------------------------------------------------
    def resolve_attention(self, req: GenerationRequest, b: Bundle) -> str:
        """Request setting, else engine setting; "auto" on the CPU demo is dense SDPA (the torch SLA
        reference costs a full dense pass plus masking there, several times slower)."""
        att = req.attention if req.attention != "auto" else self.options.attention
        if att == "auto" and b.is_demo and self.device.type == "cpu":
            return "dense"
        return att

    def _render(self, job: RenderJob, progress: Callable[[Progress], None], cancelled: Callable[[], bool], *,
                decode: bool = True) -> RenderResult | None:
        from generator.engine.transformer import set_attention

        t_job = time.perf_counter()
        req = job.request
        cp = self.cp

        def check_cancel() -> None:
            flag = cancelled()
            if cp is not None:  # every rank passes the same checks in the same order: the leader decides
                flag = cp.leader_says(flag, self.device)
            if flag:
                raise JobCancelled()

        if req.seed is None:
            raise EngineError("This job has no seed; it was not submitted through the scheduler.", code="bad_request")
        if req.frames < 1 or req.frames % 4 != 1:
            raise EngineError(f"Frames must be 1 more than a multiple of 4 (got {req.frames}).", code="bad_request")
        name = req.model or self.default_model(req.mode)
        if name is None or name not in self.models:
            raise ModelNotConfigured(f"Model '{name}' is not configured on this server.")
        check_cancel()
        b = self._bundle(name)
        if b.mode != req.mode:
            raise EngineError(f"Model '{name}' makes {b.mode} videos, not {req.mode}.", code="bad_request")
        decoder = self.resolve_decoder(name, job.decoder)  # before any GPU time is spent on the job
        text, vae = self._texts[b.text_key], self._vaes[b.vae_key]
        steps = req.steps
        timings: dict[str, float] = {}

        width, height = req.size
        image = None
        if req.mode == "i2v":
            if job.image_path is None:
                raise EngineError("Image-to-video needs an input image.", code="input_missing")
            image = i2v.open_image(job.image_path)
            if req.adaptive_resolution:
                width, height = i2v.adaptive_size(image.width, image.height, width, height)
        t_fac, s_fac = vae_ops.factors(vae)
        patch = tuple(b.experts[0].config.patch_size)
        lat_t, lat_h, lat_w = 1 + (req.frames - 1) // t_fac, height // s_fac, width // s_fac
        if width % (s_fac * patch[2]) or height % (s_fac * patch[1]):
            raise EngineError(f"{width}x{height} is not a multiple of {s_fac * patch[2]} pixels.", code="bad_request")
        loras = self._job_loras(req, b)  # read and checked before any GPU time is spent
        channels = int(b.experts[0].config.out_channels)
        shape = (1, channels, lat_t, lat_h, lat_w)

        # 1. text
        progress(Progress("text", 0, steps))
        t0 = time.perf_counter()
        emb = self._encode_text(b, text, req.prompt)
        timings["text"] = time.perf_counter() - t0
        check_cancel()

        # 2. image condition (I2V)
        y = None
        if image is not None:
            t0 = time.perf_counter()
            y = self._image_condition(vae, image, width, height, req.frames, t_fac, shape)
            timings["image"] = time.perf_counter() - t0
            check_cancel()

        # 3. denoise
        attention = self.resolve_attention(req, b)
        modes = {set_attention(m, attention, req.sla_topk) for m in b.experts}
        self.last_attention = "/".join(sorted(modes))  # what "auto" became
        t_steps = rcm.rf_times(steps, req.effective_sigma_max)
        plan = rcm.expert_schedule(t_steps, req.boundary, len(b.experts))
        cond = {"emb": emb.to(device=self.device, dtype=b.dtype)}  # cleared after sampling: frees them early
        if y is not None:
            cond["y"] = y.to(device=self.device, dtype=b.dtype)
        generator = torch.Generator(device=self.device).manual_seed(int(req.seed))

        def model_fn(x: torch.Tensor, timestep: torch.Tensor, expert: int) -> torch.Tensor:
            return self._forward(b, expert, x, timestep, cond["emb"], cond.get("y"))

        last_preview = [float("-inf")]

        def after_step(ev: rcm.StepEvent) -> None:
            timings[f"step_{ev.index + 1}"] = ev.seconds
            frames = None
            interval = job.preview_interval_s
            # Never after the last step (the video itself follows), and at most one per interval.
            if (interval is not None and ev.x0 is not None and ev.index + 1 < ev.total
                    and time.perf_counter() - last_preview[0] >= interval):
                t_prev = time.perf_counter()
                frames = self._preview(b, vae, ev.x0)
                last_preview[0] = time.perf_counter()
                timings["preview"] = timings.get("preview", 0.0) + last_preview[0] - t_prev
            progress(Progress("denoise", ev.index + 1, ev.total, step_seconds=ev.seconds, preview=frames))

        progress(Progress("denoise", 0, steps))
        t0 = time.perf_counter()
        # LoRAs live in the weights (or fp8 side branches) for this job only; restored however sampling ends.
        applied = [lora_ops.apply_loras(m, loras) for m in b.experts] if loras else []
        if loras:
            timings["lora"] = time.perf_counter() - t0
        try:
            with torch.no_grad():
                latents = rcm.sample(model_fn, shape, t_steps=t_steps, generator=generator, dtype=b.dtype,
                                     sde=req.sampler == "sde", experts=plan, before_step=lambda _i: check_cancel(),
                                     after_step=after_step)
        finally:
            for a in applied:
                a.restore()
        timings["denoise"] = time.perf_counter() - t0
        cond.clear()
        check_cancel()
        if not decode:
            return None

        # 4 + 5. one decode, streamed into the mp4 encoder as it goes (encoding overlaps decoding)
        progress(Progress("decode", steps, steps))
        if b.offload_dit:
            for m in b.experts:
                self._place(m, False)
        tiny_decoder = self._tinies[b.tiny_key] if decoder == "tiny" and b.tiny_key else None
        out, n_frames, (out_w, out_h) = self._decode_to_mp4(vae, latents, b, job.output_path, timings,
                                                            lambda: progress(Progress("encode", steps, steps)),
                                                            tiny_decoder=tiny_decoder)
        del latents
        digest, size = _sha256(out)
        timings["total"] = time.perf_counter() - t_job
        return RenderResult(
            path=out, width=out_w, height=out_h, frames=n_frames, fps=media.FPS,
            duration_s=n_frames / media.FPS, bytes=size, sha256=digest, model_label=b.label,
            is_demo=b.is_demo, timings=timings,
        )

    def _with_oom_retry(self, fn: Callable[[], Any], relieve: Callable[[], None]) -> Any:
        """Run ``fn``; on an out-of-memory error free memory, call ``relieve`` and run it once more. A second
        OOM propagates (``render`` turns it into ``OutOfMemory``)."""
        for attempt in (0, 1):
            oom = False
            try:
                return fn()
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if attempt == 1 or not is_oom(exc):
                    raise
                oom = True
            if oom:  # outside the except block: the failed attempt's tensors are released first
                log.warning("out of memory; freeing and retrying once")
                self.free_memory()
                relieve()
        raise AssertionError("unreachable")

    def _encode_text(self, b: Bundle, text: TextEncoder, prompt: str) -> torch.Tensor:
        if text.cached(prompt):
            return text.encode(prompt)

        def run() -> torch.Tensor:
            self._place(text.model, True)
            try:
                return text.encode(prompt)
            finally:
                if b.offload_text:
                    self._place(text.model, False)

        def relieve() -> None:
            for m in b.experts:
                self._place(m, False)

        return self._with_oom_retry(run, relieve)

    def _image_condition(self, vae: AutoencoderKLWan, image: Any, width: int, height: int, frames: int, t_fac: int,
                         shape: tuple[int, ...]) -> torch.Tensor:
        video = i2v.conditioning_video(i2v.image_tensor(image, width, height), frames)
        tiled = {"on": False}

        def run() -> torch.Tensor:
            if tiled["on"]:
                vae.enable_tiling()
            try:
                return vae_ops.encode_mean(vae, video)
            finally:
                vae.disable_tiling()

        def relieve() -> None:
            tiled["on"] = True

        latent = self._with_oom_retry(run, relieve)
        _, _, lt, lh, lw = shape
        if tuple(latent.shape[2:]) != (lt, lh, lw):
            raise EngineError(f"The VAE gave an image latent of {tuple(latent.shape)}, expected {shape}.")
        mask = i2v.first_frame_mask(lt, lh, lw, channels=t_fac).to(latent.device)
        return i2v.condition(mask, latent)

    def _forward(self, b: Bundle, expert: int, x: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor,
                 y: torch.Tensor | None) -> torch.Tensor:
        if self.cp is not None:
            # No OOM retry here: one rank retrying while the others wait in a collective would hang the group;
            # an OOM fails the job on every rank instead.
            model = b.experts[expert]
            if b.offload_dit:
                for i, m in enumerate(b.experts):
                    if i != expert:
                        self._place(m, False)
            self._place(model, True)
            inp = torch.cat([x, y], dim=1) if y is not None else x
            return self.cp.forward(model, inp, timestep, emb)

        def run() -> torch.Tensor:
            if b.offload_dit:
                for i, m in enumerate(b.experts):
                    if i != expert:
                        self._place(m, False)
            model = b.experts[expert]
            self._place(model, True)
            inp = torch.cat([x, y], dim=1) if y is not None else x
            return model(hidden_states=inp, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]

        return self._with_oom_retry(run, lambda: self._offload_idle(b, keep=expert))

    def _decode_to_mp4(self, vae: AutoencoderKLWan, latents: torch.Tensor, b: Bundle, path: Path,
                       timings: dict[str, float], on_encode: Callable[[], None], *,
                       tiny_decoder: taehv.TinyDecoder | None = None) -> tuple[Path, int, tuple[int, int]]:
        """Decode once and write the mp4. First streamed (each latent frame's pixels go to ffmpeg as they are
        decoded); after an out-of-memory error the transformers leave the GPU and a tiled decode (tiny decoder:
        one latent frame per pass) is encoded from memory. A second OOM propagates."""
        t0 = time.perf_counter()
        writer = media.Mp4Writer(path, fps=media.FPS)
        oom = False
        try:
            chunks = (taehv.iter_uint8_chunks(tiny_decoder, self._denormalize(vae, latents))
                      if tiny_decoder is not None else vae_ops.iter_uint8_chunks(vae, latents))
            for chunk in chunks:
                writer.write(chunk)
            timings["decode"] = time.perf_counter() - t0
            on_encode()
            t1 = time.perf_counter()
            out = writer.close()
            timings["encode"] = time.perf_counter() - t1  # what is left of encoding once decoding is done
            assert writer.size is not None
            return out, writer.frames, writer.size
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            writer.abort()
            if not is_oom(exc):
                raise
            oom = True
        except BaseException:
            writer.abort()
            raise
        assert oom  # retried outside the except block so the failed decode's tensors are freed first
        log.warning("VAE decode ran out of GPU memory; retrying tiled")
        self.free_memory()
        for m in b.experts:
            self._place(m, False)
        if tiny_decoder is not None:
            frames = taehv.decode_uint8(tiny_decoder, self._denormalize(vae, latents), chunk_frames=1)
        else:
            frames = vae_ops.decode_uint8(vae, latents, tiled=True)
        timings["decode"] = time.perf_counter() - t0
        on_encode()
        t1 = time.perf_counter()
        out = media.write_mp4(frames, path, fps=media.FPS)
        timings["encode"] = time.perf_counter() - t1
        return out, frames.shape[0], (frames.shape[2] - frames.shape[2] % 2, frames.shape[1] - frames.shape[1] % 2)


def _context_parallel(gpus_per_job: int, group: Any) -> ContextParallel:
    """The engine's context-parallel group, checked against the setting."""
    from generator.engine.context_parallel import ContextParallel

    try:
        cp = ContextParallel(group)
    except RuntimeError:
        raise EngineError(
            f"gpus_per_job = {gpus_per_job} needs the worker to run as a group of {gpus_per_job} processes "
            "(one per GPU) with torch.distributed set up; this engine was started alone.",
            code="context_parallel_unsupported",
        ) from None
    if cp.size != gpus_per_job:
        raise EngineError(f"gpus_per_job = {gpus_per_job} but the process group has {cp.size} ranks.",
                          code="context_parallel_unsupported")
    return cp


def _required(name: str, key: str, path: Path | None) -> Path:
    """A model file the configuration must name (empty settings are None in ``ModelOptions``)."""
    if path is None:
        raise ModelNotConfigured(f"models.{name}.{key} must name a local file or folder.")
    return path


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
