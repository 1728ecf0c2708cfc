"""Settings: ``config.toml`` parsed into typed sections, secrets from the environment only.

Every key has a default here equal to the documented one in the repository's ``config.toml``; a test keeps
them in step. Loading rejects unknown keys, wrong types and values outside their allowed set with a message
naming the key (``ConfigError``), so a typo fails at start instead of silently doing the default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.params import ASPECTS, ATTENTIONS, MODES, PARAMS, RESOLUTIONS, Limits
from generator.request import GenerationRequest, RequestError, validate

# Age-restricted content policy of a community, strictest first (the scheduler's moderation applies it).
POLICIES = ("block", "nsfw_channels", "allow")
MODEL_KINDS = ("tiny-t2v", "tiny-i2v", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-i2v-a14b")


class ConfigError(ValueError):
    """An invalid setting: the message names the key and what is allowed."""


@dataclass(frozen=True)
class AppSettings:
    data_dir: str = "data"  # database, inputs and outputs live under here unless set otherwise
    outputs_dir: str = "data/outputs"
    inputs_dir: str = "data/inputs"
    # Below this much free disk space at outputs_dir / inputs_dir, new jobs and uploads are refused, workers
    # stop claiming (queued jobs wait) and /readyz says not ready.
    min_free_bytes: int = 256 * 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json"


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite+aiosqlite:///data/turbobot.db"
    busy_timeout_ms: int = 5000
    synchronous: str = "NORMAL"  # NORMAL or FULL (FULL: an accepted job survives power loss)
    echo: bool = False


@dataclass(frozen=True)
class ModelSettings:
    """One configured model. Paths are local files or folders; nothing is ever downloaded."""

    kind: str = "tiny-t2v"
    transformer: str = ""  # TurboDiffusion .pth file or diffusers transformer folder
    transformer_low_noise: str = ""  # Wan2.2 I2V low-noise expert (transformer = high-noise expert)
    vae: str = ""  # Wan2.1_VAE.pth or a diffusers AutoencoderKLWan folder
    text_encoder: str = ""  # models_t5_umt5-xxl-enc-bf16.pth or a transformers UMT5EncoderModel folder
    tokenizer: str = ""  # local google/umt5-xxl tokenizer folder
    quantized: str = "auto"  # auto (detect from file), yes, no
    precision: str = "auto"  # DiT linears: auto (fp8 on cards with fp8 tensor cores, else bf16), bf16, fp8
    decoder: str = "vae"  # final decode: vae (the full Wan VAE) or tiny (the fast TAEHV decoder below)
    tiny_decoder: str = ""  # taew2_1.pth / lighttaew2_1.pth (TAEHV layout); loaded when set, used when decoder = "tiny"
    label: str = ""  # shown to users; defaults to the model name


@dataclass(frozen=True)
class EngineSettings:
    device: str = "auto"  # auto (cuda when available), cuda, cpu
    attention: str = "auto"  # auto = our Triton SLA kernels on CUDA, the torch SLA reference elsewhere
    offload: str = "auto"  # auto, none, model (move idle models to CPU)
    prompt_cache_size: int = 64
    compile: bool = True  # regional torch.compile of the transformer blocks, warmed up at worker start (CUDA only)
    compile_cache_dir: str = "data/compile_cache"  # compiled kernels on disk, so a restarted worker is ready fast
    t2v_model: str = ""  # default T2V model name; empty = first configured (or the embedded tiny one)
    i2v_model: str = ""


I2V_PROMPT = "gentle natural motion, the camera slowly pushes in, cinematic lighting"

if TYPE_CHECKING:
    class DefaultsSettings:
        """What ``make_dataclass`` builds below, as the type checker sees it."""

        i2v_prompt: str

        def __init__(self, **values: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...
else:
    # [defaults]: one key per configurable request parameter (generator.params), plus the i2v prompt.
    DefaultsSettings = dataclasses.make_dataclass(
        "DefaultsSettings",
        [(p.name, p.kind, field(default=p.default)) for p in PARAMS if p.configurable]
        + [("i2v_prompt", str, field(default=I2V_PROMPT))],  # "Animate this image" without a prompt
        frozen=True,
    )


EXPAND_SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-video model. Answer with one detailed English paragraph (at most 120 words) "
    "describing the subject, action, setting, lighting and camera. Translate non-English prompts to English. Keep "
    "the user's intent; add nothing unsafe. Answer with the prompt only."
)


@dataclass(frozen=True)
class ExpandSettings:
    """Optional prompt expansion through an OpenAI-compatible chat-completions endpoint (empty url = off)."""

    url: str = ""
    model: str = ""
    api_key_env: str = "TURBOBOT_EXPAND_API_KEY"
    timeout_seconds: float = 8.0
    short_words: int = 25  # prompts with fewer words (or non-English letters) are rewritten
    system_prompt: str = EXPAND_SYSTEM_PROMPT


@dataclass(frozen=True)
class LoraSettings:
    """Style LoRAs: ``*.safetensors`` files in ``folder`` (name = file stem; description from ``NAME.txt``)."""

    folder: str = "loras"
    max_per_job: int = 3
    max_scale: float = 2.0


@dataclass(frozen=True)
class QuotaSettings:
    max_running_per_user: int = 1
    max_queued_per_user: int = 3
    daily_jobs_per_user: int = 50
    daily_gpu_seconds_per_user: float = 1800.0
    global_queue_cap: int = 100
    chat_burst: int = 10  # token bucket per chat/guild: capacity
    chat_refill_per_minute: float = 6.0


@dataclass(frozen=True)
class SchedulerSettings:
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    max_attempts: int = 3
    poll_seconds: float = 0.5
    progress_interval_seconds: float = 1.0
    worker_devices: tuple[str, ...] = ("auto",)  # one worker per entry: "auto", "cpu", or a CUDA index
    # GPUs that render one video together (context parallelism): with N > 1, each N consecutive entries of
    # worker_devices are one worker (a group of N processes, one per device; see ``worker_groups``).
    gpus_per_job: int = 1
    worker_start_timeout_seconds: float = 300.0
    watchdog_seconds: float = 120.0  # a worker silent this long is killed and restarted
    previews: bool = True  # live previews of running jobs in the status messages and the console
    preview_interval_seconds: float = 4.0  # at most one preview per job per this many seconds

    @property
    def worker_groups(self) -> tuple[tuple[str, ...], ...]:
        """The devices of each worker: consecutive runs of ``gpus_per_job`` entries of ``worker_devices``
        (one entry each when ``gpus_per_job`` is 1)."""
        n = max(1, self.gpus_per_job)
        return tuple(tuple(self.worker_devices[i:i + n]) for i in range(0, len(self.worker_devices), n))


@dataclass(frozen=True)
class AdminSettings:
    owners: tuple[str, ...] = ()  # "discord:<user id>" / "telegram:<user id>"
    moderators: tuple[str, ...] = ()
    unlimited: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()  # when non-empty, only these users may generate
    deny: tuple[str, ...] = ()
    blocked_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModerationSettings:
    blocklist_file: str = ""  # one word or phrase a line; re-read when it changes (with [admin] blocked_words)
    nsfw_words_file: str = ""  # age-restricted words: gated by each community's policy (block by default)
    default_policy: str = "block"  # age-restricted content where a community chose nothing: block, nsfw_channels, allow
    max_policy: str = "allow"  # the most permissive policy a community's admins may choose
    # Image/video moderation (optional): a local folder of a transformers image classifier (nothing is fetched).
    image_model: str = ""  # "" = off; checks I2V input images and sampled frames of every output
    image_thresholds: dict[str, float] = field(default_factory=dict)  # label -> probability that blocks
    image_device: str = "cpu"  # cpu, or "worker" for the worker's own GPU (outputs; inputs use cpu)
    nsfw_labels: tuple[str, ...] = ()  # labels allowed where the community's age-restricted policy allows them
    held_days: float = 30.0  # held videos wait this long for an admin's release, then are deleted (0 = forever)


@dataclass(frozen=True)
class DiscordSettings:
    enabled: str = "auto"  # auto (on when a token is set), yes, no
    token_env: str = "DISCORD_TOKEN"
    api_base: str = "https://discord.com/api/v10"
    gateway_url: str = ""  # empty = ask the API (GET /gateway/bot)
    dev_guild_ids: tuple[int, ...] = ()
    sync_commands: str = "guild"  # guild (dev guilds only), global, off
    status_interval_seconds: float = 4.0
    default_upload_limit_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class TelegramSettings:
    enabled: str = "auto"
    token_env: str = "TELEGRAM_TOKEN"
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    mode: str = "polling"  # polling or webhook
    webhook_url: str = ""
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    max_upload_bytes: int = 50 * 1024 * 1024
    max_download_bytes: int = 20 * 1024 * 1024
    status_interval_private_seconds: float = 3.0
    status_interval_group_seconds: float = 12.0


@dataclass(frozen=True)
class WebSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token_env: str = "TURBOBOT_ADMIN_TOKEN"
    # Slow or stuck clients are cut so they cannot hold connections open forever:
    header_timeout_seconds: float = 10.0  # to send a request's headers, from connecting or from its first byte
    body_timeout_seconds: float = 30.0  # the longest pause while a form, upload or JSON body is arriving
    keepalive_timeout_seconds: float = 15.0  # an idle kept-alive connection is closed after this


@dataclass(frozen=True)
class StoreSettings:
    """Where inputs and outputs live (generator.scheduler.filestore). Credentials come from the environment."""

    backend: str = "local"  # local (app.inputs_dir / app.outputs_dir) or s3 (any S3-compatible store)
    endpoint_url: str = ""  # empty = AWS; e.g. http://minio:9000 or https://<account>.r2.cloudflarestorage.com
    bucket: str = ""
    prefix: str = "turbobot/"  # object keys are <prefix>inputs/<name> and <prefix>outputs/<name>
    region: str = ""
    access_key_env: str = "AWS_ACCESS_KEY_ID"  # names of the environment variables holding the credentials
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    timeout_seconds: float = 10.0  # connect timeout; an unreachable store makes workers stop claiming
    cache_dir: str = "data/store_cache"  # downloaded copies for delivery and the console (s3 only)
    cache_max_mb: int = 2048  # the cache is pruned to this size, least recently used first


@dataclass(frozen=True)
class Settings:
    app: AppSettings = field(default_factory=AppSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)
    defaults: DefaultsSettings = field(default_factory=DefaultsSettings)
    expand: ExpandSettings = field(default_factory=ExpandSettings)
    loras: LoraSettings = field(default_factory=LoraSettings)
    limits: Limits = field(default_factory=Limits)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    moderation: ModerationSettings = field(default_factory=ModerationSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    telegram: TelegramSettings = field(default_factory=TelegramSettings)
    web: WebSettings = field(default_factory=WebSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    source: str = ""  # the file these came from, "" for built-in defaults
    base_dir: str = "."  # relative paths are resolved against this

    # --- derived -------------------------------------------------------------------------------
    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def effective_models(self) -> dict[str, ModelSettings]:
        """Configured models, or the embedded tiny demo pair when none is configured."""
        if self.models:
            return dict(self.models)
        return {"tiny-t2v": ModelSettings(kind="tiny-t2v"), "tiny-i2v": ModelSettings(kind="tiny-i2v")}

    def model_names(self, mode: str) -> tuple[str, ...]:
        models = self.effective_models
        names = [n for n, m in models.items() if ("i2v" in m.kind) == (mode == "i2v")]
        preferred = self.engine.t2v_model if mode == "t2v" else self.engine.i2v_model
        if preferred in names:
            names.remove(preferred)
            names.insert(0, preferred)
        return tuple(names)

    @property
    def request_limits(self) -> Limits:
        """``[limits]`` with the model names each mode offers (from ``[models]``)."""
        return dataclasses.replace(
            self.limits, t2v_models=self.model_names("t2v"), i2v_models=self.model_names("i2v"),
            loras=tuple(self.lora_files()), max_loras=self.loras.max_per_job, max_lora_scale=self.loras.max_scale,
        )

    def lora_files(self) -> dict[str, Path]:
        """The LoRA files in ``[loras] folder`` by name (lower-cased file stem), file names only."""
        folder = self.path(self.loras.folder)
        if not folder.is_dir():
            return {}
        return {p.stem.lower(): p for p in sorted(folder.glob("*.safetensors")) if p.is_file()}

    def lora_catalog(self) -> list[tuple[str, str]]:
        """(name, description) of each LoRA file, for /loras (the worker checks the files themselves)."""
        return [(name, lora_description(path)) for name, path in self.lora_files().items()]

    def default_request(self, mode: str, prompt: str, image: str | None = None) -> GenerationRequest:
        """A request with every setting at its ``[defaults]`` value (not validated)."""
        d = self.defaults
        configured = {p.name: getattr(d, p.name) for p in PARAMS if p.configurable}
        return GenerationRequest(
            mode=mode, prompt=prompt or (d.i2v_prompt if mode == "i2v" else ""), image=image, **configured
        )

    @property
    def database_url(self) -> str:
        """The URL with a relative SQLite path resolved against ``base_dir``."""
        url = self.database.url
        prefix = "sqlite+aiosqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]).resolve())
        return url

    def secret(self, env_name: str) -> str | None:
        """A secret from ``$NAME`` or from the file named by ``$NAME_FILE``; None when unset."""
        return read_secret(env_name)


def lora_description(path: Path) -> str:
    """First line of the sidecar ``NAME.txt``, else the safetensors header's metadata ``description``."""
    side = path.with_suffix(".txt")
    try:
        if side.is_file():
            lines = side.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            return lines[0].strip()[:200] if lines else ""
        with path.open("rb") as f:  # safetensors: 8-byte little-endian header length, then the JSON header
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 16 * 2**20:
                return ""
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        text = str(meta.get("description", "")).strip()
        return text.splitlines()[0][:200] if text else ""
    except (OSError, ValueError, AttributeError):
        return ""


def read_secret(env_name: str) -> str | None:
    value = os.environ.get(env_name, "").strip()
    if value:
        return value
    file_path = os.environ.get(env_name + "_FILE", "").strip()
    if file_path:
        try:
            value = Path(file_path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{env_name}_FILE points to {file_path!r}, which cannot be read: {exc}") from None
        return value or None
    return None


# Allowed values for string settings, keyed "section.key".
CHOICES: dict[str, tuple[str, ...]] = {
    "app.log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "app.log_format": ("text", "json"),
    "database.synchronous": ("NORMAL", "FULL"),
    "engine.device": ("auto", "cuda", "cpu"),
    "engine.attention": ATTENTIONS,
    "engine.offload": ("auto", "none", "model"),
    "models.*.kind": MODEL_KINDS,
    "models.*.quantized": ("auto", "yes", "no"),
    "models.*.precision": ("auto", "bf16", "fp8"),
    "models.*.decoder": ("vae", "tiny"),
    **{f"defaults.{p.name}": p.choices for p in PARAMS if p.configurable and p.choices},
    "limits.resolutions": RESOLUTIONS,
    "limits.aspects": ASPECTS,
    "moderation.default_policy": POLICIES,
    "moderation.max_policy": POLICIES,
    "discord.enabled": ("auto", "yes", "no"),
    "discord.sync_commands": ("guild", "global", "off"),
    "telegram.enabled": ("auto", "yes", "no"),
    "telegram.mode": ("polling", "webhook"),
    "store.backend": ("local", "s3"),
}

# Keys that must never hold a secret value in the file.
_SECRET_HINTS = ("token", "password", "secret")
# Keys that contain a hint but name a path, not a secret (models.*.tokenizer is the umT5 tokenizer folder).
_NOT_SECRETS = ("tokenizer",)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}).")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(key, inner, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - no such settings
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table (got {value!r}).")
        inner = typing.get_args(tp)[1]
        return {str(k): _convert(f"{key}.{k}", inner, v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r}).")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {value!r}).")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r}).")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r}).")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _check_choice(key: str, pattern: str, value: Any) -> None:
    allowed = CHOICES.get(pattern)
    if allowed is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{key} = {v!r} is not allowed; use one of: {', '.join(allowed)}.")


def _build_section(cls: type, section: str, data: Any, pattern: str | None = None) -> Any:
    pattern = pattern or section
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of settings.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("config", True)}
    kwargs: dict[str, Any] = {}
    derived = {f.name for f in dataclasses.fields(cls)} - names
    for key, value in data.items():
        full = f"{section}.{key}"
        if key in derived:
            continue  # filled from other sections (Limits' model lists, [loras]); a round trip writes them
        if key not in names:
            raise ConfigError(f"Unknown setting {full}; known keys in [{section}]: {', '.join(sorted(names))}.")
        if isinstance(value, str) and value and any(h in key.lower() for h in _SECRET_HINTS) and not key.endswith("_env") \
                and key not in _NOT_SECRETS:
            raise ConfigError(f"{full} looks like a secret; secrets come from environment variables only.")
        converted = _convert(full, hints[key], value)
        _check_choice(full, f"{pattern}.{key}", converted)
        kwargs[key] = converted
    return cls(**kwargs)


def _validate_limits(lim: Limits) -> None:
    if lim.max_prompt_chars < 1:
        raise ConfigError(f"limits.max_prompt_chars must be at least 1 (got {lim.max_prompt_chars}).")
    if not 1 <= lim.max_steps <= 4:
        raise ConfigError(f"limits.max_steps must be from 1 to 4 (got {lim.max_steps}).")
    if lim.min_frames < 1 or lim.max_frames < lim.min_frames:
        raise ConfigError(
            f"limits.min_frames must be at least 1 and at most limits.max_frames "
            f"(got {lim.min_frames}..{lim.max_frames})."
        )
    if not any(f % 4 == 1 for f in range(lim.min_frames, min(lim.max_frames, lim.min_frames + 3) + 1)):
        raise ConfigError(
            f"limits.min_frames..max_frames ({lim.min_frames}..{lim.max_frames}) holds no frame count that is "
            "1 more than a multiple of 4."
        )
    if not 0 < lim.min_topk <= lim.max_topk <= 1:
        raise ConfigError(
            f"limits.min_topk and limits.max_topk must satisfy 0 < min_topk <= max_topk <= 1 "
            f"(got {lim.min_topk:g} and {lim.max_topk:g})."
        )
    if lim.max_sigma < 1:
        raise ConfigError(f"limits.max_sigma must be at least 1 (got {lim.max_sigma:g}).")
    for key in ("resolutions", "aspects"):
        if not getattr(lim, key):
            raise ConfigError(f"limits.{key} must list at least one value.")


def _validate_defaults(settings: Settings) -> None:
    """The default request of each mode must pass the very validation a user's request goes through."""
    limits = settings.request_limits
    for mode in MODES:
        if not limits.models_for(mode):
            continue  # that mode is simply not offered
        req = settings.default_request(mode, "" if mode == "i2v" else "x", "0" * 64 if mode == "i2v" else None)
        try:
            validate(req, limits)
        except RequestError as exc:
            key = "i2v_prompt" if exc.field == "prompt" else exc.field
            value = getattr(settings.defaults, key, None)
            raise ConfigError(f"defaults.{key} = {value!r} is refused: {exc.message}") from None


def _validate(settings: Settings) -> None:
    lim = settings.limits
    _validate_limits(lim)
    if settings.scheduler.preview_interval_seconds < 0.5:
        raise ConfigError("scheduler.preview_interval_seconds must be at least 0.5 (previews are edits of chat "
                          "messages, which the platforms rate-limit).")
    for name, model in settings.models.items():
        needs = [] if model.kind.startswith("tiny") else ["transformer", "vae", "text_encoder"]
        if model.kind == "wan2.2-i2v-a14b":
            needs.append("transformer_low_noise")
        for key in needs:
            if not getattr(model, key):
                raise ConfigError(f"models.{name}.{key} must be set to a local path for kind {model.kind!r}.")
        if model.kind.startswith("tiny"):
            if model.tiny_decoder:
                raise ConfigError(f"models.{name}.tiny_decoder: the demo model {model.kind!r} has an embedded tiny "
                                  "decoder; leave it empty.")
        elif model.decoder == "tiny" and not model.tiny_decoder:
            raise ConfigError(f"models.{name}.decoder = 'tiny' needs models.{name}.tiny_decoder set to a local "
                              "taew2_1.pth file.")
    for mode, name in (("t2v", settings.engine.t2v_model), ("i2v", settings.engine.i2v_model)):
        if name and name not in settings.model_names(mode):
            raise ConfigError(
                f"engine.{mode}_model = {name!r} is not a configured {mode} model; "
                f"configured: {', '.join(settings.model_names(mode)) or 'none'}."
            )
    _validate_defaults(settings)
    lr = settings.loras
    if lr.max_per_job < 0 or lr.max_scale <= 0:
        raise ConfigError(f"loras.max_per_job must be at least 0 and loras.max_scale more than 0 "
                          f"(got {lr.max_per_job}, {lr.max_scale:g}).")
    ex = settings.expand
    if ex.url and not ex.url.startswith(("http://", "https://")):
        raise ConfigError(f"expand.url must start with http:// or https:// (got {ex.url!r}).")
    if ex.timeout_seconds <= 0:
        raise ConfigError(f"expand.timeout_seconds must be more than 0 (got {ex.timeout_seconds:g}).")
    if settings.defaults.expand and not ex.url:
        raise ConfigError("defaults.expand = true needs expand.url (the chat-completions endpoint) to be set.")
    q = settings.quotas
    for key in ("max_running_per_user", "max_queued_per_user", "global_queue_cap"):
        if getattr(q, key) < 1:
            raise ConfigError(f"quotas.{key} must be at least 1 (got {getattr(q, key)}).")
    if settings.app.min_free_bytes < 0:
        raise ConfigError(f"app.min_free_bytes must be 0 or more (got {settings.app.min_free_bytes}).")
    if settings.scheduler.max_attempts < 1:
        raise ConfigError("scheduler.max_attempts must be at least 1.")
    if not settings.scheduler.worker_devices:
        raise ConfigError("scheduler.worker_devices must list at least one device (e.g. [\"auto\"]).")
    check_worker_groups(settings.scheduler)
    for key in ("header_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        if getattr(settings.web, key) <= 0:
            raise ConfigError(f"web.{key} must be more than 0 (got {getattr(settings.web, key)}).")
    if settings.store.cache_max_mb < 0:
        raise ConfigError(f"store.cache_max_mb must be 0 or more (got {settings.store.cache_max_mb}).")
    if settings.store.backend == "s3" and not settings.store.bucket:
        raise ConfigError("store.bucket must be set when store.backend = \"s3\".")
    for label, threshold in settings.moderation.image_thresholds.items():
        if not 0 < threshold <= 1:
            raise ConfigError(f"moderation.image_thresholds.{label} must be more than 0 and at most 1 "
                              f"(got {threshold:g}).")
    if settings.moderation.held_days < 0:
        raise ConfigError(f"moderation.held_days must be 0 (keep until an admin decides) or more "
                          f"(got {settings.moderation.held_days:g}).")
    if not 0 < settings.web.port < 65536:
        raise ConfigError(f"web.port must be from 1 to 65535 (got {settings.web.port}).")


def check_worker_groups(cfg: SchedulerSettings) -> None:
    """``gpus_per_job`` and ``worker_devices`` together: every group is N named devices of one kind (also for
    a device list given on the command line)."""
    n, devices = cfg.gpus_per_job, cfg.worker_devices
    if n < 1:
        raise ConfigError(f"scheduler.gpus_per_job must be at least 1 (got {n}).")
    if n == 1:
        return
    if len(devices) % n:
        raise ConfigError(
            f"scheduler.gpus_per_job = {n} needs scheduler.worker_devices to list a multiple of {n} devices "
            f"(each {n} consecutive entries are one worker); it lists {len(devices)}: {list(devices)}."
        )
    for group in cfg.worker_groups:
        if "auto" in group:
            raise ConfigError(
                f"scheduler.worker_devices: \"auto\" cannot be part of a group of scheduler.gpus_per_job = {n} "
                f"devices; name the GPUs (e.g. [\"0\", \"1\"]) or use \"cpu\" entries (got {list(group)})."
            )
        if not (all(d == "cpu" for d in group) or all(d.isdigit() for d in group)):
            raise ConfigError(
                f"scheduler.worker_devices: the group {list(group)} mixes CPU and GPU entries; with "
                f"scheduler.gpus_per_job = {n} each group must be {n} CUDA indices or {n} \"cpu\" entries."
            )
    gpus = [d for d in devices if d.isdigit()]
    repeated = sorted({d for d in gpus if gpus.count(d) > 1})
    if repeated:
        raise ConfigError(
            f"scheduler.worker_devices names GPU {', '.join(repeated)} more than once; with "
            f"scheduler.gpus_per_job = {n} every rank needs a GPU of its own."
        )


def settings_from_dict(data: dict[str, Any], *, source: str = "", base_dir: str = ".") -> Settings:
    sections = {f.name: f for f in dataclasses.fields(Settings) if f.name not in ("source", "base_dir")}
    hints = typing.get_type_hints(Settings)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(f"Unknown section [{name}]; known sections: {', '.join(sections)}.")
        if name == "models":
            if not isinstance(value, dict):
                raise ConfigError("[models] must hold one table per model, e.g. [models.wan13b].")
            kwargs["models"] = {
                mname: _build_section(ModelSettings, f"models.{mname}", mdata, "models.*")
                for mname, mdata in value.items()
            }
            continue
        kwargs[name] = _build_section(hints[name], name, value)
    settings = Settings(**kwargs, source=source, base_dir=base_dir)
    _validate(settings)
    return settings


def default_config_path() -> Path | None:
    env = os.environ.get("TURBOBOT_CONFIG")
    if env:
        return Path(env)
    local = Path.cwd() / "config.toml"
    return local if local.exists() else None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load ``path`` (or $TURBOBOT_CONFIG, or ./config.toml); built-in defaults when there is none."""
    cfg_path = Path(path) if path is not None else default_config_path()
    if cfg_path is None:
        return settings_from_dict({}, base_dir=str(Path.cwd()))
    try:
        raw = cfg_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {cfg_path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg_path} is not valid TOML: {exc}") from None
    return settings_from_dict(data, source=str(cfg_path), base_dir=str(cfg_path.resolve().parent))
