"""Worker supervision and events: starting and stopping the local GPU workers, what their messages and exits
mean for jobs (wake the event hub, release the jobs of lost workers), the maintenance poll (expired leases,
undelivered results), orphan sweeps and queue-position updates.

May touch: the database through ``storage`` repositories and ``queue``, the outputs and inputs folders
(sweeping orphans). See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time

from generator.scheduler import files, queue, upkeep
from generator.scheduler.admin import expire_held
from generator.scheduler.api import EventSink, JobView
from generator.scheduler.core import SchedulerCore
from generator.scheduler.health import fresh_window
from generator.scheduler.protocol import Fatal, JobChanged, Ready, StatsUpdated, WorkerMessage
from generator.scheduler.supervisor import Supervisor, WorkerHandle
from generator.scheduler.worker import EXIT_CUDA_FATAL
from storage import repo_files, repo_jobs, repo_workers
from storage.db import db_now
from storage.models import WorkerState, utcnow

log = logging.getLogger("turbobot.scheduler")

MAINTENANCE_MIN_SECONDS = 0.2  # local workers push hints; this poll is the safety net
UPKEEP_SECONDS = 300.0  # orphaned inputs, abandoned uploads, the download cache: slow-changing, listing costs
STOP_GRACE_SECONDS = 10.0  # a pass waits at most the busy timeout per statement; past this it is stuck
POSITION_UPDATES = 20  # queued jobs told their new place after a claim...
POSITION_UPDATE_SECONDS = 2.0  # ...at most this often (chat front ends edit status messages slower still)
HELD_EXPIRY_SECONDS = 600.0  # how often held videos past [moderation] held_days are looked for (they wait days)


class WorkerEvents:
    """Lifecycle of the service: ``start``/``stop``, event subscriptions and everything workers report."""

    def __init__(self, core: SchedulerCore, *, engine_factory: str | None, worker_env: dict[str, str]) -> None:
        self._core = core
        self._engine_factory = engine_factory
        self._worker_env = worker_env
        self._positions_at = 0.0
        self._positions_timer: asyncio.TimerHandle | None = None

    async def start(self, run_workers: bool = True) -> None:
        core = self._core
        if core.started:
            return
        core.started = True
        core.stopping.clear()
        # An unusable folder must not stop the service: it reports not-ready and refuses jobs until fixed.
        problem = await core.storage_problem()
        if problem:
            log.error("storage is not usable: %s; new jobs are refused until it is fixed", problem)
        await self._requeue_expired()
        if run_workers:
            # Workers of a previous run died with their parent (stdin EOF): give their jobs back now instead
            # of waiting for the leases. Only workers that are really gone: another process (a `turbobot
            # generate` beside `turbobot run`) may be serving this database right now.
            await self._release_gone_workers()
        await self.sweep()
        await asyncio.to_thread(files.remove_partial_inputs, core.inputs_dir)
        if run_workers:
            core.supervisor = Supervisor(
                core.settings, on_message=self._on_worker_message, on_exit=self._on_worker_exit,
                engine_factory=self._engine_factory, env=self._worker_env,
                on_kill=lambda _h: core.metrics.watchdog_kills.inc(),
            )
            core.supervisor.start()
        core.spawn(self._maintenance())

    async def stop(self) -> None:
        core = self._core
        if not core.started:
            return
        core.started = False
        core.stopping.set()
        if self._positions_timer is not None:
            self._positions_timer.cancel()
            self._positions_timer = None
        tasks = list(core.tasks)
        if tasks:
            # Let each finish its current database pass; cancel only what is stuck past the grace.
            _done, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
            for task in stuck:
                task.cancel()
            for task in stuck:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        core.tasks.clear()
        if core.supervisor is not None:
            await core.supervisor.stop()
            core.supervisor = None
        await core.hub.close()
        with contextlib.suppress(Exception):
            await self.sweep()

    def subscribe(self, platform: str, sink: EventSink) -> None:
        self._core.hub.subscribe(platform, sink)
        if self._core.started:
            # Results that finished while this front end was away.
            self._core.spawn(self._offer_undelivered())

    async def _offer_undelivered(self) -> None:
        hub = self._core.hub
        try:
            async with self._core.db.read() as s:
                ids = await repo_jobs.undelivered_terminal(s, hub.platforms, limit=500)
            for job_id in ids:
                if not hub.in_backoff(job_id):
                    hub.wake(job_id)
        except Exception:
            log.exception("offering undelivered results failed")

    # --- the event hub's callbacks ----------------------------------------------------------------
    async def load_for_events(self, job_id: int) -> tuple[JobView, bool] | None:
        async with self._core.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        if job is None:
            return None
        return await self._core.cache.view_of(job), job.delivered_at is not None

    async def mark_delivered(self, job_id: int) -> bool:
        async with self._core.db.write() as s:
            return await repo_jobs.mark_delivered(s, job_id, utcnow())

    def count_event(self, kind: str, ok: bool) -> None:
        self._core.metrics.events.labels(kind).inc()
        if not ok:
            self._core.metrics.delivery_failures.inc()

    # --- workers ------------------------------------------------------------------------------------
    def _on_worker_message(self, handle: WorkerHandle, msg: WorkerMessage) -> None:
        core = self._core
        if isinstance(msg, Fatal):
            log.error("worker %s cannot load the engine: %s", handle.worker_id, handle.error)
            if core.supervisor is not None and all(h.error for h in core.supervisor.handles):
                core.workers_failed.set()
        elif isinstance(msg, Ready):
            core.workers_failed.clear()
        elif isinstance(msg, StatsUpdated):
            core.cache.invalidate_stats()
        elif isinstance(msg, JobChanged):
            if msg.fenced:
                core.metrics.fenced.inc()
            core.hub.wake(msg.job_id)
            if msg.change in ("started", "done"):
                core.cache.invalidate_queue()
                if msg.change == "done":
                    core.cache.invalidate_stats()  # the worker has just updated its step-time averages
                else:
                    self._schedule_position_updates()

    async def _on_worker_exit(self, handle: WorkerHandle, returncode: int | None) -> None:
        core = self._core
        core.metrics.worker_exit(returncode)
        # Stopped by us (Ctrl+C, SIGTERM, stop()): hand its job back without counting the attempt. A CUDA
        # failure that happened to coincide is still a failed attempt.
        clean = core.supervisor is not None and core.supervisor.stopping and returncode != EXIT_CUDA_FATAL
        # Its row is marked stopped in the same transaction: it would otherwise read "idle" with a fresh
        # heartbeat for a while, and /readyz and `turbobot ready` must not count a worker that has exited.
        await self._release([handle.worker_id], hand_back=clean, exited=True)
        await self.sweep()

    def _schedule_position_updates(self) -> None:
        """After a claim, the first queued jobs moved up: tell them (at most once per interval)."""
        core = self._core
        if self._positions_timer is not None or not core.hub.platforms:
            return
        every = max(core.cfg.progress_interval_seconds, POSITION_UPDATE_SECONDS)
        wait = max(0.0, self._positions_at + every - time.monotonic())

        def fire() -> None:
            self._positions_timer = None
            self._positions_at = time.monotonic()
            core.spawn(self._wake_top_queued())

        self._positions_timer = asyncio.get_running_loop().call_later(wait, fire)

    async def _wake_top_queued(self) -> None:
        with contextlib.suppress(Exception):
            snap = await self._core.cache.snapshot()
            for job_id in snap.order[:POSITION_UPDATES]:
                self._core.hub.wake(job_id)

    # --- maintenance ----------------------------------------------------------------------------
    async def _release(self, ids: list[str], *, hand_back: bool = False, exited: bool = False) -> None:
        async with self._core.db.write() as s:
            moved = await queue.release_worker(
                s, ids, now=await db_now(s), max_attempts=self._core.cfg.max_attempts, hand_back=hand_back
            )
            if exited:
                for worker_id in ids:
                    await repo_workers.mark_stopped(s, worker_id)
        self._after_transitions(moved)

    async def _release_gone_workers(self) -> None:
        async with self._core.db.read() as s:
            now = await db_now(s)  # heartbeats carry the database's time, so age them by it
            holders = await queue.running_worker_ids(s)
            rows = {w.id: w for w in await repo_workers.list_workers(s)} if holders else {}
        fresh = fresh_window(self._core.cfg)
        gone = [w for w in holders if worker_gone(rows.get(w), now=now, fresh=fresh)]
        if gone:
            log.info("releasing the jobs of gone worker(s) %s", ", ".join(gone))
            await self._release(gone)

    async def _requeue_expired(self) -> None:
        # Leases were set by the database's clock (whatever the workers' hosts say): expire them by it too.
        async with self._core.db.read() as s:
            expired = await queue.has_expired(s, now=await db_now(s))
        if not expired:
            return
        async with self._core.db.write() as s:
            now = await db_now(s)
            moved = await queue.requeue_expired(s, now=now, max_attempts=self._core.cfg.max_attempts)
        self._after_transitions(moved)

    def _after_transitions(self, moved: list[queue.Transition]) -> None:
        if not moved:
            return
        core = self._core
        core.cache.invalidate_queue()
        core.metrics.requeued.inc(sum(t.state == "queued" and not t.handed_back for t in moved))
        for t in moved:
            if t.handed_back:
                log.info("job %s handed back to the queue (shutdown; the attempt does not count)", t.job_id)
            else:
                log.warning("job %s -> %s (worker lost)", t.job_id, t.state)
            core.hub.wake(t.job_id)
        if any(t.state == "queued" for t in moved):
            core.wake_workers()

    async def sweep(self) -> int:
        """Delete orphaned output files (see ``files``); returns how many were removed. Held videos count as
        accepted (``output_paths_for_jobs`` lists them), so they stay until an admin decides."""
        if self._core.store.kind != "local":
            return await self._sweep_store()
        found = await asyncio.to_thread(files.list_job_files, self._core.outputs_dir)
        if not found:
            return 0
        ids = sorted({f.job_id for f in found})
        async with self._core.db.read() as s:
            states = await repo_jobs.job_states(s, ids)
            accepted = set(await repo_files.output_paths_for_jobs(s, ids))
        doomed = files.orphans(found, states, accepted)
        removed = await asyncio.to_thread(files.remove_files, doomed)
        if removed:
            log.info("swept %d orphaned output file(s)", removed)
        return removed

    async def _sweep_store(self) -> int:
        """The sweep for an object store: the same rule, on the objects listed under ``outputs/``. A store
        that is down is retried at the next sweep."""
        store = self._core.store
        try:
            listed = await asyncio.to_thread(store.list, "outputs")
        except Exception as exc:
            log.warning("cannot list the object store for the sweep: %s", exc)
            return 0
        found: list[tuple[str, int, int, bool]] = []
        for name, ref in listed:
            m = files.match_job_file(name)
            if m is not None:
                found.append((ref, *m))
        if not found:
            return 0
        ids = sorted({f[1] for f in found})
        async with self._core.db.read() as s:
            states = await repo_jobs.job_states(s, ids)
            accepted = set(await repo_files.output_paths_for_jobs(s, ids))
        doomed = []
        for ref, job_id, attempt, partial in found:
            state = states.get(job_id)
            if state is not None and state[0] == "running" and state[1] == attempt:
                continue
            if not partial and ref in accepted:
                continue
            doomed.append(ref)

        def remove() -> int:
            return sum(1 for ref in doomed if store.delete(ref))

        try:
            removed = await asyncio.to_thread(remove)
        except Exception as exc:
            log.warning("sweep of the object store stopped: %s", exc)
            return 0
        if removed:
            log.info("swept %d orphaned output object(s)", removed)
        return removed

    async def upkeep(self, now: float | None = None) -> upkeep.UpkeepReport:
        """Orphaned input images, abandoned uploads and the download cache (see ``upkeep``)."""
        core = self._core
        report = await upkeep.sweep_store(core.db, core.store, now=now)
        if core.store.kind != "local":
            cfg = core.settings.store
            report.cached = await asyncio.to_thread(
                upkeep.prune_cache, core.settings.path(cfg.cache_dir).resolve(), cfg.cache_max_mb * 2**20, now=now
            )
        return report

    async def _maintenance(self) -> None:
        """Requeue expired leases; look at running, waited-for and undelivered jobs (remote workers and
        lost hints are covered by this poll); every few minutes, the files' upkeep."""
        core = self._core
        interval = max(MAINTENANCE_MIN_SECONDS, core.cfg.poll_seconds)
        upkeep_at = time.monotonic() + UPKEEP_SECONDS
        held_at = -HELD_EXPIRY_SECONDS
        while not core.stopping.is_set():
            try:
                if time.monotonic() >= upkeep_at:
                    upkeep_at = time.monotonic() + UPKEEP_SECONDS
                    await self.upkeep()
                await self._requeue_expired()
                if time.monotonic() - held_at >= HELD_EXPIRY_SECONDS:
                    held_at = time.monotonic()
                    expired = await expire_held(core)
                    if expired:
                        log.info("deleted %d held video(s) past [moderation] held_days", expired)
                async with core.db.read() as s:
                    ids = set(await repo_jobs.active_job_ids(s))
                    ids.update(await repo_jobs.undelivered_terminal(s, core.hub.platforms, limit=200))
                ids.update(core.hub.waited_jobs)
                for job_id in ids:
                    if not core.hub.in_backoff(job_id):
                        core.hub.wake(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler maintenance pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(core.stopping.wait(), timeout=interval)


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
