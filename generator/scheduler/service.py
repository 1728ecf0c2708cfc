"""``Scheduler``: the service every front end talks to (implements ``SchedulerAPI``).

Lifecycle::

    scheduler = Scheduler(settings)            # or Scheduler(settings, db=existing_database)
    await scheduler.start(run_workers=True)    # False: no local GPU workers (they run elsewhere)
    scheduler.subscribe("discord", sink)       # events for jobs whose target platform is "discord"
    ...
    await scheduler.stop()

``start`` does not create or migrate tables: run ``storage.migrate.upgrade_database(url)`` first.
On start: expired leases are requeued, jobs of workers that are really gone (stale heartbeat, or a process
of this host that no longer exists) are released, orphaned files are swept, and undelivered results are offered to sinks as they subscribe.

Nothing here blocks the event loop: the database is reached through the async driver, file work goes to
threads and GPU work happens in worker processes (``generator.scheduler.worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from generator.request import USER_FIELDS, GenerationRequest, RequestError, new_seed, validate
from generator.scheduler import files, queue
from generator.scheduler.admission import (
    admit,
    blocked_word,
    check_access,
    quota_view,
    role_of,
)
from generator.scheduler.api import (
    TERMINAL_KINDS,
    DeliveryTarget,
    EventSink,
    JobView,
    Lineage,
    QuotaView,
    Refusal,
    RefusalCode,
    Requester,
    SubmitResult,
)
from generator.scheduler.disk import STORAGE_MESSAGE, storage_problem
from generator.scheduler.estimate import Shape, StepStats
from generator.scheduler.events import EventHub
from generator.scheduler.metrics import SchedulerMetrics
from generator.scheduler.supervisor import Supervisor, WorkerHandle
from generator.scheduler.views import job_view
from generator.scheduler.worker import EXIT_CUDA_FATAL
from storage import repo_audit, repo_files, repo_jobs, repo_quotas, repo_users, repo_workers
from storage.db import Database
from storage.models import Job, WorkerState, utcnow
from turbobot.config import Settings

log = logging.getLogger("turbobot.scheduler")

SNAPSHOT_TTL = 0.25  # seconds a queue snapshot may be reused for positions
STATS_TTL = 2.0
MAINTENANCE_MIN_SECONDS = 0.2  # local workers push hints; this poll is the safety net
POSITION_UPDATES = 20  # queued jobs told their new place after a claim...
POSITION_UPDATE_SECONDS = 2.0  # ...at most this often (chat front ends edit status messages slower still)


class Scheduler:
    """The job service. See the module docstring for the lifecycle."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database | None = None,
        engine_factory: str | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        """``engine_factory`` ("module:function" or "/file.py:function") overrides the workers' engine
        (default: ``generator.engine:create_engine``, or ``$TURBOBOT_ENGINE_FACTORY``)."""
        self.settings = settings
        self.cfg = settings.scheduler
        self._own_db = db is None
        self.db = db or Database(
            settings.database_url,
            busy_timeout_ms=settings.database.busy_timeout_ms,
            synchronous=settings.database.synchronous,
            echo=settings.database.echo,
        )
        self.outputs_dir = settings.path(settings.app.outputs_dir).resolve()
        self.inputs_dir = settings.path(settings.app.inputs_dir).resolve()
        self.metrics = SchedulerMetrics()
        self.metrics_registry = self.metrics.registry  # picked up by the web console's /metrics
        self.hub = EventHub(
            load=self._load_for_events, mark_delivered=self._mark_delivered,
            progress_interval=self.cfg.progress_interval_seconds, on_event=self._count_event,
        )
        self._workers_failed = asyncio.Event()
        self._engine_factory = engine_factory
        self._worker_env = dict(worker_env or {})
        self.supervisor: Supervisor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._snap: tuple[float, queue.QueueSnapshot] | None = None
        self._stats: tuple[float, StepStats, int] | None = None
        self._positions_at = 0.0
        self._positions_timer: asyncio.TimerHandle | None = None
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, run_workers: bool = True) -> None:
        if self._started:
            return
        self._started = True
        # An unusable folder must not stop the service: it reports not-ready and refuses jobs until fixed.
        problem = await self.storage_problem()
        if problem:
            log.error("storage is not usable: %s; new jobs are refused until it is fixed", problem)
        await self._requeue_expired()
        if run_workers:
            # Workers of a previous run died with their parent (stdin EOF): give their jobs back now instead
            # of waiting for the leases. Only workers that are really gone: another process (a `turbobot
            # generate` beside `turbobot run`) may be serving this database right now.
            await self._release_gone_workers()
        await self.sweep()
        await asyncio.to_thread(files.remove_partial_inputs, self.inputs_dir)
        if run_workers:
            self.supervisor = Supervisor(
                self.settings, on_message=self._on_worker_message, on_exit=self._on_worker_exit,
                engine_factory=self._engine_factory, env=self._worker_env,
                on_kill=lambda _h: self.metrics.watchdog_kills.inc(),
            )
            self.supervisor.start()
        self._spawn(self._maintenance())

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._positions_timer is not None:
            self._positions_timer.cancel()
        if self.supervisor is not None:
            await self.supervisor.stop()
            self.supervisor = None
        await self.hub.close()
        with contextlib.suppress(Exception):
            await self.sweep()
        if self._own_db:
            await self.db.dispose()

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- roles ----------------------------------------------------------------------------------
    def is_owner(self, requester: Requester) -> bool:
        return role_of(self.settings, requester.key) == "owner"

    def is_moderator(self, requester: Requester) -> bool:
        return self.is_owner(requester) or requester.key in self.settings.admin.moderators

    # --- submit / remix -------------------------------------------------------------------------
    async def submit(
        self,
        request: GenerationRequest,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        parent_id: int | None = None,
    ) -> SubmitResult:
        return await self._submit(request, requester, target, idempotency_key, parent_id=parent_id,
                                  lineage="remix" if parent_id is not None else "")

    async def _submit(
        self,
        request: GenerationRequest,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        parent_id: int | None,
        lineage: Lineage,
    ) -> SubmitResult:
        key = (idempotency_key or "").strip()[:160] or f"auto:{uuid.uuid4()}"
        try:
            check_access(self.settings, requester)
            if self._workers_failed.is_set():
                # Details (paths, library errors) go to the operator's log and /readyz, not to chat users.
                raise Refusal(
                    RefusalCode.ENGINE_UNAVAILABLE,
                    "The video engine is not available right now (the server's model failed to load). "
                    "The operator has been told; please try again later.",
                )
            try:  # the one validation of a request: every front end and remix enters here
                req = validate(request, self.settings.request_limits, role_of(self.settings, requester.key))
            except RequestError as exc:
                raise Refusal(RefusalCode.INVALID, exc.message) from None
            word = blocked_word(self.settings, req.prompt)
            if word is not None:
                raise Refusal(RefusalCode.BLOCKED_WORDS, "That prompt contains words this bot does not accept.")
            if req.seed is None:
                req = req.with_seed(new_seed())
            await self._require_storage()
            job_id, duplicate = await self._enqueue(req, requester, target, key, parent_id, lineage)
        except Refusal as refusal:
            await self._audit_refusal(requester, refusal, request)
            raise
        if not duplicate:
            self._snap = None
            if self.supervisor is not None:
                self.supervisor.wake()
        view = await self.get(job_id)
        if view is None:  # deleted in between (e.g. /forget): nothing sensible to return
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        if not duplicate:
            self.hub.wake(job_id, view)  # the "queued" event, without loading the job again
        return SubmitResult(view, duplicate=duplicate)

    async def _enqueue(
        self, req: GenerationRequest, requester: Requester, target: DeliveryTarget, key: str, parent_id: int | None,
        lineage: Lineage = "",
    ) -> tuple[int, bool]:
        now = utcnow()
        role = role_of(self.settings, requester.key)
        try:
            async with self.db.write() as s:
                existing = await repo_jobs.id_for_key(s, key)
                if existing is not None:
                    return existing, True
                input_id = None
                if req.image:
                    row = await repo_files.get_input(s, req.image)
                    if row is None:
                        raise Refusal(RefusalCode.INVALID, "That image is no longer stored here; please attach it again.")
                    input_id = row.id
                if parent_id is not None and await s.get(Job, parent_id) is None:
                    raise Refusal(RefusalCode.NOT_FOUND, f"Job #{parent_id} does not exist (any more).")
                user = await repo_users.upsert_user(
                    s, requester.platform, requester.user_id, display_name=requester.display_name, role=role
                )
                await admit(s, self.settings, user, role, target, now)
                job_id = await repo_jobs.insert_job(
                    s, user=user, idempotency_key=key, request=req.to_dict(), platform=target.platform,
                    chat_id=target.chat_id, guild_id=target.guild_id, status_message_id=target.status_message_id,
                    reply_to_message_id=target.reply_to_message_id, delivery=target.extra, parent_id=parent_id,
                    lineage=lineage, input_id=input_id, now=now,
                )
                await repo_quotas.add_usage(s, user.id, repo_quotas.utc_day(now), jobs=1)
                await repo_audit.add_audit(
                    s, "submit", user_id=user.id, job_id=job_id, detail=f"{req.mode} seed={req.seed} {req.prompt}",
                    now=now,
                )
                return job_id, False
        except IntegrityError:
            # Same idempotency key inserted concurrently (PostgreSQL): that one wins.
            async with self.db.read() as s:
                existing = await repo_jobs.id_for_key(s, key)
            if existing is None:
                raise
            return existing, True

    async def _audit_refusal(self, requester: Requester, refusal: Refusal, request: GenerationRequest) -> None:
        try:
            async with self.db.write() as s:
                user = await repo_users.find_user(s, requester.platform, requester.user_id)
                prompt = request.prompt if isinstance(request.prompt, str) else ""
                await repo_audit.add_audit(
                    s, "refused", user_id=user.id if user else None,
                    detail=f"{refusal.code}: {requester.key} {prompt[:200]}",
                )
        except Exception:
            log.exception("could not write the refusal to the audit log")

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
        async with self.db.read() as s:
            parent = await repo_jobs.get_job(s, parent_id)
        if parent is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{parent_id} does not exist (any more).")
        mine = parent.user.platform == requester.platform and parent.user.platform_user_id == requester.user_id
        same_chat = bool(parent.chat_id) and (parent.platform, parent.chat_id) == (target.platform, target.chat_id)
        if not (mine or same_chat or self.is_moderator(requester)):
            # Only what was posted where you are: job ids are guessable, other people's DMs are private.
            raise Refusal(RefusalCode.FORBIDDEN, f"Job #{parent_id} was not posted here, so it cannot be remixed here.")
        base = dict(parent.request)
        changes = dict(overrides or {})
        bad = sorted(set(changes) - set(USER_FIELDS))
        if bad:
            raise Refusal(RefusalCode.INVALID, f"'{bad[0]}' cannot be changed in a remix.")
        if new_seed:
            changes["seed"] = None
        try:
            request = GenerationRequest.from_dict({**base, **changes})
        except (RequestError, TypeError) as exc:
            raise Refusal(RefusalCode.INVALID, getattr(exc, "message", str(exc))) from None
        # A Retry is the same request with a fresh seed; anything changed makes it a remix.
        lineage: Lineage = "retry" if new_seed and not changes.keys() - {"seed"} else "remix"
        return await self._submit(request, requester, target, idempotency_key, parent_id=parent_id, lineage=lineage)

    async def storage_problem(self) -> str:
        """"" when the outputs and inputs folders take new files with enough free space, else why not."""
        folders = (self.outputs_dir, self.inputs_dir)
        return await asyncio.to_thread(storage_problem, folders, self.settings.app.min_free_bytes)

    async def _require_storage(self) -> None:
        problem = await self.storage_problem()
        if problem:
            # The path and the reason are for the operator's log and /readyz, not for chat users.
            log.warning("refusing new work: %s", problem)
            raise Refusal(RefusalCode.STORAGE_UNAVAILABLE, STORAGE_MESSAGE)

    async def save_input(self, requester: Requester, png_bytes: bytes, width: int, height: int) -> str:
        await self._require_storage()
        sha = await asyncio.to_thread(lambda: hashlib.sha256(png_bytes).hexdigest())
        try:
            path = await asyncio.to_thread(files.write_atomic, self.inputs_dir, f"{sha}.png", png_bytes)
        except OSError as exc:  # e.g. the disk filled up between the check and the write
            log.warning("cannot store an input image: %s", exc)
            raise Refusal(RefusalCode.STORAGE_UNAVAILABLE, STORAGE_MESSAGE) from None
        role = role_of(self.settings, requester.key)
        async with self.db.write() as s:
            user = await repo_users.upsert_user(
                s, requester.platform, requester.user_id, display_name=requester.display_name, role=role
            )
            await repo_files.add_input(
                s, sha256=sha, path=str(path), size=len(png_bytes), width=width, height=height, user_id=user.id
            )
        return sha

    async def set_status_message(self, job_id: int, message_id: str, extra: dict[str, Any] | None = None) -> None:
        async with self.db.write() as s:
            await repo_jobs.set_status_message(s, job_id, message_id, extra)

    # --- cancel / delete / forget ---------------------------------------------------------------
    async def _owned_job(self, job_id: int, requester: Requester) -> Job:
        async with self.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        if job is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        mine = job.user.platform == requester.platform and job.user.platform_user_id == requester.user_id
        if not mine and not self.is_moderator(requester):
            raise Refusal(RefusalCode.FORBIDDEN, "Only the person who asked for this video (or a moderator) can do that.")
        return job

    async def cancel(self, job_id: int, requester: Requester) -> JobView:
        await self._owned_job(job_id, requester)
        async with self.db.write() as s:
            outcome = await queue.cancel(s, job_id, now=utcnow())
        if outcome == "missing":
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        if outcome.startswith("already_"):
            state = outcome.removeprefix("already_")
            raise Refusal(RefusalCode.NOT_CANCELLABLE, f"Job #{job_id} has already finished ({state}).", job_id=job_id)
        if outcome == "requested" and self.supervisor is not None:
            self.supervisor.cancel(job_id)
        self._snap = None
        self.hub.wake(job_id)
        view = await self.get(job_id)
        assert view is not None
        return view

    async def delete(self, job_id: int, requester: Requester) -> None:
        job = await self._owned_job(job_id, requester)
        if job.state not in TERMINAL_KINDS:
            raise Refusal(RefusalCode.NOT_FINISHED, f"Job #{job_id} is still {job.state}; cancel it first.", job_id=job_id)
        async with self.db.write() as s:
            paths = await repo_files.output_paths_for_jobs(s, [job_id])
            await repo_jobs.delete_jobs(s, [job_id])
            actor = await repo_users.find_user(s, requester.platform, requester.user_id)
            await repo_audit.add_audit(
                s, "delete", user_id=actor.id if actor else None, detail=f"job {job_id} by {requester.key}"
            )
        await asyncio.to_thread(files.remove_files, [Path(p) for p in paths])

    async def forget(self, requester: Requester) -> int:
        """Delete the requester's jobs, outputs, inputs and audit entries. The user row itself stays
        (anonymised) so blocks and today's quota usage survive a /forget."""
        async with self.db.write() as s:
            user = await repo_users.find_user(s, requester.platform, requester.user_id, lock=True)
            if user is None:
                return 0
            ids = await repo_jobs.user_job_ids(s, user.id)
            paths = await repo_files.output_paths_for_jobs(s, ids)
            inputs = await repo_files.inputs_only_used_by(s, user.id)
            paths += [row.path for row in inputs]
            await repo_jobs.delete_jobs(s, ids)
            for row in inputs:
                await repo_files.delete_input(s, row)
            await repo_audit.delete_for_user(s, user.id)
            user.display_name = ""
            await repo_audit.add_audit(s, "forget", user_id=user.id, detail=f"{len(ids)} jobs")
        await asyncio.to_thread(files.remove_files, [Path(p) for p in paths])
        if self.supervisor is not None:
            for job_id in ids:
                self.supervisor.cancel(job_id)  # their workers discard the result (rows are gone)
        self._snap = None
        return len(ids)

    # --- reading --------------------------------------------------------------------------------
    async def get(self, job_id: int) -> JobView | None:
        async with self.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        return None if job is None else await self._view_of(job)

    async def wait(self, job_id: int, *, stop_on_worker_error: bool = False) -> JobView:
        """Until job ``job_id`` is terminal (independent of sinks and delivery); for the CLI and tests.
        Bound it with ``async with asyncio.timeout(...)``. ``stop_on_worker_error``: raise
        ``Refusal(RefusalCode.ENGINE_UNAVAILABLE)`` when every local worker has failed to load its engine."""
        fut = self.hub.add_waiter(job_id)
        failed: asyncio.Future[Any] | None = None
        try:
            view = await self.get(job_id)
            if view is None:
                raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
            if view.state in TERMINAL_KINDS:
                return view
            self.hub.wake(job_id)
            if not stop_on_worker_error:
                return await fut
            failed = asyncio.ensure_future(self._workers_failed.wait())
            await asyncio.wait({fut, failed}, return_when=asyncio.FIRST_COMPLETED)
            if fut.done():
                return fut.result()
            errors = "; ".join(sorted(set(self.worker_errors.values())))
            raise Refusal(RefusalCode.ENGINE_UNAVAILABLE, f"The video engine could not start: {errors}", job_id=job_id)
        finally:
            if failed is not None:
                failed.cancel()
            self.hub.remove_waiter(job_id, fut)

    async def jobs_for(
        self, requester: Requester, *, limit: int = 10, states: tuple[str, ...] | None = None, query: str = ""
    ) -> list[JobView]:
        async with self.db.read() as s:
            user = await repo_users.find_user(s, requester.platform, requester.user_id)
            if user is None:
                return []
            jobs = await repo_jobs.list_user_jobs(s, user.id, limit=limit, states=states, query=query)
        return await self._views_of(jobs)

    async def queue_info(self, requester: Requester) -> tuple[list[JobView], QuotaView, int]:
        now = utcnow()
        role = role_of(self.settings, requester.key)
        async with self.db.read() as s:
            user = await repo_users.find_user(s, requester.platform, requester.user_id)
            quota = await quota_view(s, self.settings, user, role, now)
            jobs = (
                await repo_jobs.list_user_jobs(s, user.id, limit=100, states=("queued", "running"))
                if user is not None
                else []
            )
        views = await self._views_of(jobs)
        snap = await self._snapshot()
        views.sort(key=lambda v: (v.state != "running", v.position or 0, v.id))
        return views, quota, snap.length

    # --- admin ----------------------------------------------------------------------------------
    def _require_owner(self, actor: Requester) -> None:
        if not self.is_owner(actor):
            raise Refusal(RefusalCode.FORBIDDEN, "Only the bot's owners can do that.")

    @staticmethod
    def _split_key(user_key: str) -> tuple[str, str]:
        platform, sep, uid = user_key.strip().partition(":")
        if not sep or not platform or not uid:
            raise Refusal(RefusalCode.INVALID, f"Users are written platform:id, e.g. discord:1234 (got '{user_key}').")
        return platform, uid

    async def set_limits(
        self,
        actor: Requester,
        user_key: str,
        *,
        max_queued: int | None = None,
        daily_jobs: int | None = None,
        daily_gpu_seconds: float | None = None,
    ) -> None:
        self._require_owner(actor)
        platform, uid = self._split_key(user_key)
        async with self.db.write() as s:
            user = await repo_users.upsert_user(s, platform, uid, role=role_of(self.settings, user_key))
            await repo_users.set_limits(
                s, user, max_queued=max_queued, daily_jobs=daily_jobs, daily_gpu_seconds=daily_gpu_seconds
            )
            await repo_audit.add_audit(
                s, "set_limits", user_id=user.id,
                detail=f"by {actor.key}: queued={max_queued} jobs={daily_jobs} gpu={daily_gpu_seconds}",
            )

    async def block(self, actor: Requester, user_key: str, reason: str = "") -> None:
        """Block a user; their queued jobs are cancelled (a running one finishes)."""
        self._require_owner(actor)
        platform, uid = self._split_key(user_key)
        now = utcnow()
        async with self.db.write() as s:
            user = await repo_users.upsert_user(s, platform, uid, role=role_of(self.settings, user_key))
            await repo_users.set_blocked(s, user, True, reason)
            queued = await repo_jobs.list_user_jobs(s, user.id, limit=10_000, states=("queued",))
            for job in queued:
                await queue.cancel(s, job.id, now=now)
            await repo_audit.add_audit(s, "block", user_id=user.id, detail=f"by {actor.key}: {reason}")
        for job in queued:
            self.hub.wake(job.id)
        self._snap = None

    async def unblock(self, actor: Requester, user_key: str) -> None:
        self._require_owner(actor)
        platform, uid = self._split_key(user_key)
        async with self.db.write() as s:
            user = await repo_users.find_user(s, platform, uid)
            if user is None:
                return
            await repo_users.set_blocked(s, user, False)
            await repo_audit.add_audit(s, "unblock", user_id=user.id, detail=f"by {actor.key}")

    # --- events ---------------------------------------------------------------------------------
    def subscribe(self, platform: str, sink: EventSink) -> None:
        self.hub.subscribe(platform, sink)
        if self._started:
            # Results that finished while this front end was away.
            self._spawn(self._offer_undelivered())

    async def _offer_undelivered(self) -> None:
        try:
            async with self.db.read() as s:
                ids = await repo_jobs.undelivered_terminal(s, self.hub.platforms, limit=500)
            for job_id in ids:
                if not self.hub.in_backoff(job_id):
                    self.hub.wake(job_id)
        except Exception:
            log.exception("offering undelivered results failed")

    async def _load_for_events(self, job_id: int) -> tuple[JobView, bool] | None:
        async with self.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        if job is None:
            return None
        return await self._view_of(job), job.delivered_at is not None

    async def _mark_delivered(self, job_id: int) -> bool:
        async with self.db.write() as s:
            return await repo_jobs.mark_delivered(s, job_id, utcnow())

    def _count_event(self, kind: str, ok: bool) -> None:
        self.metrics.events.labels(kind).inc()
        if not ok:
            self.metrics.delivery_failures.inc()

    @property
    def worker_errors(self) -> dict[str, str]:
        """worker id -> why its engine failed to load (empty while every worker loads fine)."""
        if self.supervisor is None:
            return {}
        return {h.worker_id: h.error for h in self.supervisor.handles if h.error}

    def _on_worker_message(self, handle: WorkerHandle, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "fatal":
            log.error("worker %s cannot load the engine: %s", handle.worker_id, handle.error)
            if self.supervisor is not None and all(h.error for h in self.supervisor.handles):
                self._workers_failed.set()
            return
        if kind == "ready":
            self._workers_failed.clear()
            return
        if kind == "stats":
            self._stats = None
            return
        if kind != "job":
            return
        if msg.get("fenced"):
            self.metrics.fenced.inc()
        job_id = int(msg["id"])
        self.hub.wake(job_id)
        if msg.get("k") in ("started", "done"):
            self._snap = None
            if msg.get("k") == "done":
                self._stats = None  # the worker has just updated its step-time averages
            else:
                self._schedule_position_updates()

    async def _on_worker_exit(self, handle: WorkerHandle, returncode: int | None) -> None:
        self.metrics.worker_exit(returncode)
        # Stopped by us (Ctrl+C, SIGTERM, stop()): hand its job back without counting the attempt. A CUDA
        # failure that happened to coincide is still a failed attempt.
        clean = self.supervisor is not None and self.supervisor.stopping and returncode != EXIT_CUDA_FATAL
        await self._release([handle.worker_id], hand_back=clean)
        await self.sweep()

    def _schedule_position_updates(self) -> None:
        """After a claim, the first queued jobs moved up: tell them (at most once per interval)."""
        if self._positions_timer is not None or not self.hub.platforms:
            return
        every = max(self.cfg.progress_interval_seconds, POSITION_UPDATE_SECONDS)
        wait = max(0.0, self._positions_at + every - time.monotonic())

        def fire() -> None:
            self._positions_timer = None
            self._positions_at = time.monotonic()
            self._spawn(self._wake_top_queued())

        self._positions_timer = asyncio.get_running_loop().call_later(wait, fire)

    async def _wake_top_queued(self) -> None:
        with contextlib.suppress(Exception):
            snap = await self._snapshot()
            for job_id in snap.order[:POSITION_UPDATES]:
                self.hub.wake(job_id)

    # --- views ----------------------------------------------------------------------------------
    async def _snapshot(self) -> queue.QueueSnapshot:
        now_m = time.monotonic()
        if self._snap is not None and now_m - self._snap[0] < SNAPSHOT_TTL:
            return self._snap[1]
        async with self.db.read() as s:
            snap = await queue.snapshot(s, now=utcnow())
        self._snap = (now_m, snap)
        return snap

    async def _step_stats(self) -> tuple[StepStats, int]:
        now_m = time.monotonic()
        if self._stats is not None and now_m - self._stats[0] < STATS_TTL:
            return self._stats[1], self._stats[2]
        async with self.db.read() as s:
            rows = await repo_workers.list_workers(s)
        fresh = self._fresh_window()
        now = utcnow()
        live = [w for w in rows if w.state in ("idle", "busy") and now - w.heartbeat_at < fresh]
        stats = StepStats.merge([StepStats.from_dict((w.info or {}).get("ema")) for w in rows])
        n = max(1, len(live))
        self._stats = (now_m, stats, n)
        return stats, n

    async def _view_of(self, job: Job) -> JobView:
        return (await self._views_of([job]))[0]

    async def _views_of(self, jobs: list[Job]) -> list[JobView]:
        if not any(j.state in ("queued", "running") for j in jobs):
            return [job_view(j) for j in jobs]
        if any(j.state == "queued" for j in jobs):
            snap = await self._snapshot()
        else:
            # Running jobs need only their own shape and progress for an ETA: skip the queue scan.
            running = [j for j in jobs if j.state == "running"]
            snap = queue.QueueSnapshot(
                running=[j.id for j in running],
                shapes={j.id: Shape.of(j.model, j.resolution, j.aspect, j.frames, j.steps) for j in running},
                steps_done={j.id: j.progress_step for j in running},
            )
        stats, n_workers = await self._step_stats()
        now = utcnow()
        return [job_view(j, snap=snap, stats=stats, n_workers=n_workers, now=now) for j in jobs]

    # --- maintenance ----------------------------------------------------------------------------
    async def _release(self, ids: list[str], *, hand_back: bool = False) -> None:
        async with self.db.write() as s:
            moved = await queue.release_worker(
                s, ids, now=utcnow(), max_attempts=self.cfg.max_attempts, hand_back=hand_back
            )
        self._after_transitions(moved)

    async def _release_gone_workers(self) -> None:
        now = utcnow()
        async with self.db.read() as s:
            holders = await queue.running_worker_ids(s)
            rows = {w.id: w for w in await repo_workers.list_workers(s)} if holders else {}
        gone = [w for w in holders if worker_gone(rows.get(w), now=now, fresh=self._fresh_window())]
        if gone:
            log.info("releasing the jobs of gone worker(s) %s", ", ".join(gone))
            await self._release(gone)

    async def _requeue_expired(self) -> None:
        now = utcnow()
        async with self.db.read() as s:
            expired = await queue.has_expired(s, now=now)
        if not expired:
            return
        async with self.db.write() as s:
            moved = await queue.requeue_expired(s, now=now, max_attempts=self.cfg.max_attempts)
        self._after_transitions(moved)

    def _after_transitions(self, moved: list[queue.Transition]) -> None:
        if not moved:
            return
        self._snap = None
        self.metrics.requeued.inc(sum(t.state == "queued" and not t.handed_back for t in moved))
        for t in moved:
            if t.handed_back:
                log.info("job %s handed back to the queue (shutdown; the attempt does not count)", t.job_id)
            else:
                log.warning("job %s -> %s (worker lost)", t.job_id, t.state)
            self.hub.wake(t.job_id)
        if self.supervisor is not None and any(t.state == "queued" for t in moved):
            self.supervisor.wake()

    async def sweep(self) -> int:
        """Delete orphaned output files (see ``files``); returns how many were removed."""
        found = await asyncio.to_thread(files.list_job_files, self.outputs_dir)
        if not found:
            return 0
        ids = sorted({f.job_id for f in found})
        async with self.db.read() as s:
            states = await repo_jobs.job_states(s, ids)
            accepted = set(await repo_files.output_paths_for_jobs(s, ids))
        doomed = files.orphans(found, states, accepted)
        removed = await asyncio.to_thread(files.remove_files, doomed)
        if removed:
            log.info("swept %d orphaned output file(s)", removed)
        return removed

    async def _maintenance(self) -> None:
        """Requeue expired leases; look at running, waited-for and undelivered jobs (remote workers and
        lost hints are covered by this poll)."""
        interval = max(MAINTENANCE_MIN_SECONDS, self.cfg.poll_seconds)
        while True:
            try:
                await self._requeue_expired()
                async with self.db.read() as s:
                    ids = set(await repo_jobs.active_job_ids(s))
                    ids.update(await repo_jobs.undelivered_terminal(s, self.hub.platforms, limit=200))
                ids.update(self.hub.waited_jobs)
                for job_id in ids:
                    if not self.hub.in_backoff(job_id):
                        self.hub.wake(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler maintenance pass failed")
            await asyncio.sleep(interval)

    def _fresh_window(self) -> dt.timedelta:
        """How old a worker row's heartbeat may be while the worker still counts as alive (the rule of
        /readyz; the worker writes its row often enough, see ``worker.row_heartbeat_seconds``)."""
        return dt.timedelta(seconds=max(self.cfg.watchdog_seconds, 3 * self.cfg.heartbeat_seconds))

    # --- health ---------------------------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /readyz: the database takes a write lock, some worker's heartbeat is fresh and the outputs and
        inputs folders are usable."""
        detail: dict[str, Any] = {}
        try:
            async with self.db.write():
                pass
            detail["database"] = "ok"
        except Exception as exc:
            detail["database"] = f"error: {type(exc).__name__}"
        async with self.db.read() as s:
            rows = await repo_workers.list_workers(s)
        fresh = self._fresh_window()
        now = utcnow()
        detail["workers"] = [
            {"id": w.id, "state": w.state, "device": w.device, "age_s": round((now - w.heartbeat_at).total_seconds(), 1),
             "restarts": w.restarts}
            for w in rows
        ]
        live = any(w.state in ("idle", "busy") and now - w.heartbeat_at < fresh for w in rows)
        detail["storage"] = await self.storage_problem() or "ok"
        return detail["database"] == "ok" and live and detail["storage"] == "ok", detail



def pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def worker_gone(row: WorkerState | None, *, now: dt.datetime, fresh: dt.timedelta) -> bool:
    """A job's worker is really gone (its job may be released before the lease runs out) when it has no
    row, its row's heartbeat is older than ``fresh``, or it ran on this host and its process no longer
    exists. A live worker of another process serving the same database is none of these."""
    if row is None or now - row.heartbeat_at > fresh:
        return True
    info = row.info or {}
    return info.get("host") == socket.gethostname() and not pid_exists(int(row.pid or info.get("pid") or 0))
