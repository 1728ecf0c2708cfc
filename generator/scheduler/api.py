"""What every front end (Discord, Telegram, web console, CLI) uses to talk to the scheduler.

Front ends only: build a ``GenerationRequest`` (``bots.commands``), call ``scheduler.jobs.submit`` /
``scheduler.admin.cancel`` / ``scheduler.views.get`` ..., and register one ``EventSink`` per platform to hear
about their jobs. May touch nothing: types and protocols only. Terminal events are
delivered exactly once per job: the sink returns normally -> the job is marked delivered; it raises -> the
event is offered again later (also after a restart). Sinks must therefore be idempotent-friendly and
quick; long uploads are fine (they run in the front end's event loop, not the scheduler's critical path).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from generator.request import GenerationRequest

if TYPE_CHECKING:
    from generator.scheduler.community import Communities
    from generator.scheduler.health import Readiness
    from generator.scheduler.reads import Listings

EventKind = Literal["queued", "started", "progress", "succeeded", "failed", "cancelled"]
TERMINAL_KINDS = ("succeeded", "failed", "cancelled")
# What a running job is doing, in order: encoding the prompt, sampling (step k of n), decoding the latents,
# finishing the mp4. "" = not reported yet (or a worker of an older version).
Phase = Literal["", "text", "sampling", "decoding", "encoding"]
PHASES: tuple[Phase, ...] = ("text", "sampling", "decoding", "encoding")
# How a job came from its parent: "remix" (same seed, changes) or "retry" (same request, new seed).
Lineage = Literal["", "remix", "retry", "extend"]


@dataclass(frozen=True)
class Requester:
    """Who asks. ``key`` ("platform:id") is what config's owners/allow/deny lists name."""

    platform: str  # discord, telegram, web, cli
    user_id: str
    display_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True)
class DeliveryTarget:
    """Where the job's status and result go (persisted with the job so a restart can still deliver)."""

    platform: str
    chat_id: str = ""
    guild_id: str = ""  # Discord guild or "" for DMs; Telegram: "" (chat_id says it)
    status_message_id: str = ""  # set later with Scheduler.set_status_message
    reply_to_message_id: str = ""
    nsfw: bool = False  # the channel is flagged age-restricted (Discord NSFW channels)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. Discord application id + interaction token


class RefusalCode(StrEnum):
    """Why a request was refused: the one list of codes. Each has an HTTP status (the web console's answer)
    and a metric label (``turbobot_refusals{reason=...}``); ``bots.texts`` has a default wording for each."""

    INVALID = "invalid"  # a request field is out of range or malformed
    BLOCKED = "blocked"  # the user is denied or blocked
    BLOCKED_WORDS = "blocked_words"
    NSFW_BLOCKED = "nsfw_blocked"  # age-restricted content where the community's policy does not allow it
    BLOCKED_IMAGE = "blocked_image"  # the input image was flagged by the image moderation model
    COMMUNITY_OFF = "community_off"  # the community's admins switched the bot off
    CHANNEL_NOT_ALLOWED = "channel_not_allowed"  # not one of the community's allowed channels
    MODEL_NOT_CONFIGURED = "model_not_configured"
    FORBIDDEN = "forbidden"  # not the owner of the job, or not an admin
    NOT_FOUND = "not_found"
    NOT_CANCELLABLE = "not_cancellable"  # already finished
    NOT_FINISHED = "not_finished"  # delete of a queued or running job
    QUOTA_DAILY = "quota_daily"
    QUOTA_GPU = "quota_gpu"
    QUEUED_CAP = "queued_cap"
    RUNNING_CAP = "running_cap"
    CHAT_RATE = "chat_rate"
    QUEUE_FULL = "queue_full"
    ENGINE_UNAVAILABLE = "engine_unavailable"  # no worker could load the engine
    STORAGE_UNAVAILABLE = "storage_unavailable"  # outputs/inputs folder not writable, or the disk is full
    INTERNAL = "internal"  # an unexpected error in a front end (logged)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def metric_label(self) -> str:
        return self.value


_HTTP_STATUS: dict[RefusalCode, int] = {
    RefusalCode.INVALID: 400,
    RefusalCode.BLOCKED_WORDS: 400,
    RefusalCode.NSFW_BLOCKED: 403,
    RefusalCode.BLOCKED_IMAGE: 400,
    RefusalCode.COMMUNITY_OFF: 403,
    RefusalCode.CHANNEL_NOT_ALLOWED: 403,
    RefusalCode.MODEL_NOT_CONFIGURED: 400,
    RefusalCode.BLOCKED: 403,
    RefusalCode.FORBIDDEN: 403,
    RefusalCode.NOT_FOUND: 404,
    RefusalCode.NOT_CANCELLABLE: 409,
    RefusalCode.NOT_FINISHED: 409,
    RefusalCode.QUOTA_DAILY: 429,
    RefusalCode.QUOTA_GPU: 429,
    RefusalCode.QUEUED_CAP: 429,
    RefusalCode.RUNNING_CAP: 429,
    RefusalCode.CHAT_RATE: 429,
    RefusalCode.QUEUE_FULL: 503,
    RefusalCode.ENGINE_UNAVAILABLE: 503,
    RefusalCode.STORAGE_UNAVAILABLE: 503,
    RefusalCode.INTERNAL: 500,
}


class Refusal(Exception):
    """A request the scheduler will not accept. ``message`` is friendly and safe to show the user."""

    def __init__(
        self,
        code: RefusalCode | str,
        message: str,
        *,
        retry_at: dt.datetime | None = None,
        job_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = RefusalCode(code)  # an unknown code is a programming error: fail loudly here
        self.message = message
        self.retry_at = retry_at
        self.job_id = job_id


class DeliverLater(Exception):
    """Raised by a sink whose front end cannot reach its platform now (stopped, or not started yet in this
    process). A normal event, not an error: the event hub logs it in one line; a terminal event is offered
    again later (and after a restart), a status update is simply not shown."""


@dataclass(frozen=True)
class OutputView:
    path: str
    bytes: int
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float
    sha256: str
    model_label: str
    is_demo: bool


@dataclass(frozen=True)
class JobView:
    """A read-only snapshot of a job, safe to hand to any front end."""

    id: int
    state: str  # queued, running, succeeded, failed, cancelled
    request: GenerationRequest  # seed always set
    requester: Requester
    target: DeliveryTarget
    parent_id: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: int
    progress_step: int
    progress_total: int
    position: int | None  # 1-based place in the queue while queued, else None
    queue_length: int | None
    eta: dt.datetime | None  # estimated finish time, when known
    output: OutputView | None
    error_code: str
    error_message: str
    timings: dict[str, float]
    cancel_requested: bool = False  # running and asked to stop: it ends "cancelled" after the current step
    progress_phase: Phase = ""  # while running; progress_step/progress_total stay the sampler's steps
    lineage: Lineage = ""  # with parent_id: "remix", "retry" or "extend" ("" for children recorded before lineage was)
    # While running: the latest live preview (a file-store reference to a small animated GIF; "" = none) and
    # how many previews this attempt has had, so a front end can tell a new one from the one it shows.
    preview: str = ""
    preview_version: int = 0

    @property
    def seed(self) -> int:
        assert self.request.seed is not None
        return self.request.seed


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    job: JobView

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


@dataclass(frozen=True)
class SubmitResult:
    job: JobView
    duplicate: bool  # the idempotency key was seen before: this is the earlier job


@dataclass(frozen=True)
class QuotaView:
    running: int
    queued: int
    max_running: int | None  # None = unlimited
    max_queued: int | None
    jobs_today: int
    daily_jobs: int | None
    gpu_seconds_today: float
    daily_gpu_seconds: float | None
    resets_at: dt.datetime


EventSink = Callable[[JobEvent], Awaitable[None]]


class AdmissionAPI(Protocol):
    """Where requests enter (``Scheduler.jobs``): checked once (access, validation, quotas), then queued."""

    async def submit(
        self,
        request: GenerationRequest,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        parent_id: int | None = None,
    ) -> SubmitResult:
        """Validate, check quotas and enqueue in one transaction. Same key twice -> the first job."""

    async def remix(
        self,
        parent_id: int,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        overrides: dict[str, Any] | None = None,
        new_seed: bool = False,
    ) -> SubmitResult:
        """Re-run job ``parent_id``: same seed and parameters, ``overrides`` applied (field -> value,
        names as in ``GenerationRequest``). ``new_seed=True`` is "Retry": same parameters, fresh seed."""

    async def extend(
        self,
        parent_id: int,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        prompt: str | None = None,
    ) -> SubmitResult:
        """Continue job ``parent_id``'s video: an I2V job from its last frame with the parent's seed and
        settings, ``prompt`` (default: the parent's). The delivered video is the parent's followed by the new
        frames. Same permission rule as a remix; needs a succeeded parent and a configured I2V model."""

    async def save_input(self, requester: Requester, png_bytes: bytes, width: int, height: int) -> str:
        """Store a validated, re-encoded input image; returns its sha256 to put in ``request.image``."""

    async def set_status_message(self, job_id: int, message_id: str, extra: dict[str, Any] | None = None) -> None:
        """Remember the status message of a job (and platform extras) so later events edit it."""


class AdminAPI(Protocol):
    """Admin actions (``Scheduler.admin``): on jobs (owner or moderator) and users (owners)."""

    async def cancel(self, job_id: int, requester: Requester) -> JobView:
        """Cancel a queued job at once, or a running one between sampler steps (owner or moderator)."""

    async def delete(self, job_id: int, requester: Requester) -> None:
        """Delete a finished job's output and row (owner or moderator)."""

    async def forget(self, requester: Requester) -> int:
        """Delete all of the requester's jobs, inputs, outputs and rows; returns jobs deleted."""

    def is_owner(self, requester: Requester) -> bool: ...

    def is_moderator(self, requester: Requester) -> bool: ...

    async def set_limits(self, actor: Requester, user_key: str, *, max_queued: int | None = None,
                         daily_jobs: int | None = None, daily_gpu_seconds: float | None = None) -> None:
        """Owner only: per-user quota overrides (``user_key`` = "platform:id")."""

    async def block(self, actor: Requester, user_key: str, reason: str = "") -> None: ...

    async def unblock(self, actor: Requester, user_key: str) -> None: ...

    async def release_held(self, job_id: int, actor: Requester) -> JobView:
        """Moderator: deliver a video the moderation model held, through the normal delivery path."""

    async def delete_held(self, job_id: int, actor: Requester) -> None:
        """Moderator: delete a video the moderation model held."""



class ViewsAPI(Protocol):
    """Read-only views (``Scheduler.views``), with queue position and ETA."""

    async def get(self, job_id: int) -> JobView | None: ...

    async def wait(self, job_id: int, *, stop_on_worker_error: bool = False) -> JobView:
        """Until the job is terminal (the CLI and tests; bound it with ``asyncio.timeout``)."""

    async def jobs_for(self, requester: Requester, *, limit: int = 10, states: tuple[str, ...] | None = None,
                       query: str = "") -> list[JobView]:
        """The requester's recent jobs, newest first; ``query`` filters by prompt substring or job id
        (autocomplete)."""

    async def queue_info(self, requester: Requester) -> tuple[list[JobView], QuotaView, int]:
        """(the requester's queued and running jobs, their quota, total queue length)."""

    async def storage_problem(self) -> str:
        """"" when new videos and inputs can be stored (folders writable, enough free disk), else why not
        (for the operator; users get ``Refusal("storage_unavailable")`` from submit and save_input)."""

    async def readiness(self) -> Readiness:
        """The one readiness check (``/readyz``, ``turbobot ready``)."""

    def worker_errors(self) -> dict[str, str]:
        """Worker id -> why its engine failed to load."""

    def workers_loading(self) -> bool:
        """Local workers exist and none serves yet."""


class SchedulerAPI(Protocol):
    """What front ends hold: the verbs grouped by job, plus event subscription. Implemented by
    ``generator.scheduler.service.Scheduler``.

    Every method is async and safe to call from the front end's event loop (no GPU work inside).
    Refusals are raised as ``Refusal`` with a friendly message; ``RequestError`` from validation is turned
    into ``Refusal(code="invalid")`` too, so front ends need to catch only ``Refusal``.
    """

    @property
    def jobs(self) -> AdmissionAPI: ...

    @property
    def admin(self) -> AdminAPI: ...

    @property
    def views(self) -> ViewsAPI: ...

    @property
    def listings(self) -> Listings:
        """Listings across every user (web console, CLI)."""

    @property
    def communities(self) -> Communities:
        """Per-community settings (``/settings`` in chat, the console's view); applied by submit."""

    @property
    def metrics_registry(self) -> Any:
        """The scheduler's Prometheus registry (the console's /metrics)."""

    def subscribe(self, platform: str, sink: EventSink) -> None:
        """Receive events for jobs whose target platform is ``platform``; undelivered terminal events of
        that platform (from before a restart) are offered again right after subscribing."""
