"""SQLAlchemy 2 typed models: users, jobs (the queue itself), inputs, outputs, quota usage, chat buckets.

The jobs table is the queue (docs/scheduler.md): one store for jobs, seeds, outputs, remix lineage and quotas.
Types are portable (SQLite and PostgreSQL); times are timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from generator.request import GenerationRequest

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores aware datetimes; SQLite returns naive ones, which are read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class RequestJSON(TypeDecorator[GenerationRequest]):
    """A ``GenerationRequest`` stored as JSON: ``to_dict`` once on the way in, ``from_stored`` once on the way
    out (the driver does the JSON text either side)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: GenerationRequest | None, dialect: Any) -> dict[str, Any] | None:
        return None if value is None else value.to_dict()

    def process_result_value(self, value: dict[str, Any] | None, dialect: Any) -> GenerationRequest | None:
        return None if value is None else GenerationRequest.from_stored(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id", name="platform_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))  # discord, telegram, web, cli
    platform_user_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16), default="user")  # user, moderator, owner, unlimited
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    blocked_reason: Mapped[str] = mapped_column(String(256), default="")
    # Per-user overrides of the configured quotas; NULL = use the configured value.
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="user", passive_deletes=True)


class InputImage(Base):
    __tablename__ = "inputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(512))  # server-generated, under app.inputs_dir
    bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(64), default="image/png")
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_user_state", "user_id", "state"),
        Index("ix_jobs_state_lease", "state", "lease_until"),
        # The scheduler's poll for terminal-but-undelivered jobs must not scan all of history.
        Index("ix_jobs_delivered_state", "delivered_at", "state"),
        # Fair claim: each user's first queued job, read from the index alone.
        Index("ix_jobs_queue_heads", "state", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    input_id: Mapped[int | None] = mapped_column(ForeignKey("inputs.id", ondelete="SET NULL"), nullable=True)
    # How this job came from parent_id: "remix" (same seed, changes) or "retry" (same request, new seed);
    # "" for originals (and for children made before this was recorded).
    lineage: Mapped[str] = mapped_column(String(8), default="", server_default="")

    # Delivery target: where the front end shows status and the result.
    platform: Mapped[str] = mapped_column(String(16))
    chat_id: Mapped[str] = mapped_column(String(64), default="")  # channel / chat id
    guild_id: Mapped[str] = mapped_column(String(64), default="")
    status_message_id: Mapped[str] = mapped_column(String(64), default="")
    reply_to_message_id: Mapped[str] = mapped_column(String(64), default="")
    delivery: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # platform extras (interaction token...)

    # The request: one typed JSON column (``RequestJSON``), written and read as a ``GenerationRequest``.
    # ``mode`` and ``prompt`` are also kept as plain columns because queries filter and search on them (the
    # console's mode filter, prompt search); no other parameter is queried, so none has its own column.
    mode: Mapped[str] = mapped_column(String(8))
    prompt: Mapped[str] = mapped_column(Text)
    request: Mapped[GenerationRequest] = mapped_column(RequestJSON)

    # Queue state.
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker_id: Mapped[str] = mapped_column(String(64), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    # What the running job is doing: "text", "sampling" (progress_step of progress_total), "decoding",
    # "encoding"; "" before the first report.
    progress_phase: Mapped[str] = mapped_column(String(16), default="", server_default="")
    # The latest live preview of the running attempt (a file-store reference, "" = none) and how many it has had.
    preview: Mapped[str] = mapped_column(String(512), default="", server_default="")
    preview_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    # Timestamps and timings.
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    error_code: Mapped[str] = mapped_column(String(32), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")  # user-facing, never a stack trace

    user: Mapped[User] = relationship(back_populates="jobs")
    output: Mapped[Output | None] = relationship(back_populates="job", uselist=False, passive_deletes=True)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    path: Mapped[str] = mapped_column(String(512))  # server-generated name under app.outputs_dir
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    duration_s: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    fps: Mapped[int] = mapped_column(Integer, default=16)
    model_label: Mapped[str] = mapped_column(String(128), default="")
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)  # made by the untrained embedded model
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="output")


class HeldOutput(Base):
    """A finished video the moderation model held: kept (never delivered, listed, served or remixed) until an
    admin releases it (it becomes the job's ``Output``) or deletes it, or ``[moderation] held_days`` pass."""

    __tablename__ = "held_outputs"
    __table_args__ = (Index("ix_held_outputs_held_at", "held_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    path: Mapped[str] = mapped_column(String(512))  # the same server-generated name a delivered output gets
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    duration_s: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    fps: Mapped[int] = mapped_column(Integer, default=16)
    model_label: Mapped[str] = mapped_column(String(128), default="")
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    labels: Mapped[str] = mapped_column(String(256), default="")  # what the classifier matched, comma-separated
    held_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class QuotaUsage(Base):
    """Per user and UTC day: jobs accepted and GPU-seconds used (the daily quota counters)."""

    __tablename__ = "quota_usage"
    __table_args__ = (UniqueConstraint("user_id", "day", name="user_day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[str] = mapped_column(String(10))  # ISO date, portable across backends
    jobs: Mapped[int] = mapped_column(Integer, default=0)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class ChatBucket(Base):
    """Token bucket per chat / guild (rate limit shared by everyone in it)."""

    __tablename__ = "chat_buckets"
    __table_args__ = (UniqueConstraint("platform", "scope_id", name="platform_scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[str] = mapped_column(String(64))
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CommunitySettings(Base):
    """Settings a community's admins chose in chat (a Discord server, a Telegram group): only ever tighter
    than the global config, which stays the ceiling. Every change is also written to the audit log."""

    __tablename__ = "community_settings"
    __table_args__ = (UniqueConstraint("platform", "community_id", name="platform_community"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    community_id: Mapped[str] = mapped_column(String(64))
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # see generator.scheduler.community
    updated_by: Mapped[str] = mapped_column(String(80), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerState(Base):
    """One row per GPU worker: heartbeat for /readyz, engine info for the console."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer, default=0)
    device: Mapped[str] = mapped_column(String(32), default="")
    state: Mapped[str] = mapped_column(String(16), default="starting")  # starting, idle, busy, stopped
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # model, attention, GPU memory, step times


class AuditLog(Base):
    """Abuse log: who asked for what, refusals and moderator actions."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    action: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
