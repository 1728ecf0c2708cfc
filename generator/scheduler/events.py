"""Turning job state changes into events for front-end sinks.

The database is the truth; this hub only looks at it when told a job changed (a hint from a local worker,
a submit, a cancel) and on a slow poll (workers on other machines, lost hints, undelivered results).
Per job, examinations run one at a time, so a job's events come out in order: started, progress (at most
one per ``progress_interval``, (phase, step) increasing), then exactly one terminal event per process lifetime,
marked delivered in the database once every sink of its platform returned normally. A sink that raises
gets the terminal event again later (with backoff) and after a restart.

``subscribe("*", sink)`` adds an observer of every platform's events; observers never affect delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from generator.scheduler.api import (
    PHASES,
    TERMINAL_KINDS,
    DeliverLater,
    EventKind,
    EventSink,
    JobEvent,
    JobView,
)

log = logging.getLogger("turbobot.events")

ANY_PLATFORM = "*"
RETRY_DELAYS = (1.0, 5.0, 15.0, 60.0, 300.0)

_PHASE_RANK = {phase: rank for rank, phase in enumerate(PHASES)}
_PHASE_RANK[""] = _PHASE_RANK["sampling"]  # a worker that reports steps only

# (view, delivered) for a job id; None when the job no longer exists.
Loader = Callable[[int], Awaitable[tuple[JobView, bool] | None]]


@dataclass
class _Track:
    started_attempt: int = 0
    progress_key: tuple[int, int, int] = (-1, -1, -1)  # (phase rank, step, preview version) last sent
    progress_at: float = 0.0
    progress_timer: asyncio.TimerHandle | None = None
    position: int | None = None
    queued_attempt: int = -1  # the attempts value "queued" was last announced for
    retry_at: float = 0.0
    failures: int = 0


class EventHub:
    def __init__(
        self,
        *,
        load: Loader,
        mark_delivered: Callable[[int], Awaitable[bool]],
        progress_interval: float,
        on_event: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``on_event(kind, ok)`` is told about every event handed to sinks (for metrics)."""
        self._on_event = on_event or (lambda kind, ok: None)
        self._load = load
        self._mark_delivered = mark_delivered
        self._interval = progress_interval
        self._sinks: dict[str, list[EventSink]] = defaultdict(list)
        self._tracks: dict[int, _Track] = {}
        self._dirty: set[int] = set()
        self._busy: set[int] = set()
        self._waiters: dict[int, list[asyncio.Future[JobView]]] = defaultdict(list)
        self._preloaded: dict[int, JobView] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.delivered_count = 0

    # --- subscription ---------------------------------------------------------------------------
    def subscribe(self, platform: str, sink: EventSink) -> None:
        self._sinks[platform].append(sink)

    @property
    def platforms(self) -> list[str]:
        return [p for p, sinks in self._sinks.items() if sinks and p != ANY_PLATFORM]

    # --- waiting (CLI, tests) -------------------------------------------------------------------
    def add_waiter(self, job_id: int) -> asyncio.Future[JobView]:
        fut: asyncio.Future[JobView] = asyncio.get_running_loop().create_future()
        self._waiters[job_id].append(fut)
        return fut

    def remove_waiter(self, job_id: int, fut: asyncio.Future[JobView]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[job_id]

    @property
    def waited_jobs(self) -> list[int]:
        return list(self._waiters)

    def _resolve_waiters(self, view: JobView) -> None:
        for fut in self._waiters.pop(view.id, []):
            if not fut.done():
                fut.set_result(view)

    # --- hints ----------------------------------------------------------------------------------
    def wake(self, job_id: int, view: JobView | None = None) -> None:
        """Job ``job_id`` may have changed: look at it (soon, in order with its other events).
        ``view``: a fresh, undelivered snapshot the caller already has (saves loading it)."""
        if self._closed:
            return
        if view is not None:
            self._preloaded[job_id] = view
        else:
            self._preloaded.pop(job_id, None)  # something newer happened: load the job instead
        self._dirty.add(job_id)
        if job_id not in self._busy:
            self._busy.add(job_id)
            self._spawn(self._drain(job_id))

    def in_backoff(self, job_id: int) -> bool:
        track = self._tracks.get(job_id)
        return track is not None and track.retry_at > time.monotonic()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, job_id: int) -> None:
        try:
            while job_id in self._dirty and not self._closed:
                self._dirty.discard(job_id)
                try:
                    await self._examine(job_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("event dispatch for job %s failed", job_id)
        finally:
            self._busy.discard(job_id)

    async def _examine(self, job_id: int) -> None:
        pre = self._preloaded.pop(job_id, None)
        loaded = (pre, False) if pre is not None else await self._load(job_id)
        if loaded is None:
            self._forget(job_id)
            return
        view, delivered = loaded
        track = self._tracks.setdefault(job_id, _Track())
        if view.state == "running":
            if track.started_attempt != view.attempts:
                track.started_attempt = view.attempts
                track.progress_key = (-1, -1, -1)
                track.progress_at = 0.0
                await self._emit("started", view)
            await self._progress(job_id, view, track)
        elif view.state == "queued":
            # New, back in the queue after a lost worker, or moved up.
            moved = view.position is not None and view.position != track.position
            if track.queued_attempt != view.attempts or moved:
                track.queued_attempt = view.attempts
                track.position = view.position
                await self._emit("queued", view)
        else:
            self._resolve_waiters(view)
            if delivered or view.target.platform not in self.platforms:
                self._forget(job_id)  # nothing (more) to do until a sink for its platform subscribes
                return
            if track.retry_at > time.monotonic():
                return
            await self._deliver(view, track)

    async def _progress(self, job_id: int, view: JobView, track: _Track) -> None:
        """At most one progress event per interval; a newer phase or step inside the interval is sent when it
        ends. (Decoding and encoding are new phases at the same step, so they are news too; so is a new preview.)"""
        key = (_PHASE_RANK.get(view.progress_phase, 0), view.progress_step, view.preview_version)
        if key <= track.progress_key or view.progress_total <= 0:
            return
        wait = track.progress_at + self._interval - time.monotonic()
        if wait <= 0:
            track.progress_key = key
            track.progress_at = time.monotonic()
            await self._emit("progress", view)
        elif track.progress_timer is None:

            def fire() -> None:
                track.progress_timer = None
                self.wake(job_id)

            track.progress_timer = asyncio.get_running_loop().call_later(wait, fire)

    async def _deliver(self, view: JobView, track: _Track) -> None:
        kind: EventKind = view.state  # type: ignore[assignment]
        assert kind in TERMINAL_KINDS
        event = JobEvent(kind, view)
        ok = True
        for sink in list(self._sinks.get(view.target.platform, [])):
            try:
                await sink(event)
            except asyncio.CancelledError:
                raise
            except DeliverLater as exc:
                ok = False
                log.info("job %s %s: not delivered on %s now (%s); will offer it again", view.id, kind,
                         view.target.platform, exc)
            except Exception:
                ok = False
                log.exception("sink for %s raised on job %s %s; will retry", view.target.platform, view.id, kind)
        await self._observe(event)
        self._on_event(kind, ok)
        if not ok:
            delay = RETRY_DELAYS[min(track.failures, len(RETRY_DELAYS) - 1)]
            track.failures += 1
            track.retry_at = time.monotonic() + delay
            asyncio.get_running_loop().call_later(delay, self.wake, view.id)
            return
        if await self._mark_delivered(view.id):
            self.delivered_count += 1
        self._forget(view.id)

    async def _emit(self, kind: EventKind, view: JobView) -> None:
        event = JobEvent(kind, view)
        for sink in list(self._sinks.get(view.target.platform, [])):
            try:
                await sink(event)
            except asyncio.CancelledError:
                raise
            except DeliverLater as exc:
                log.info("job %s %s: not shown on %s (%s)", view.id, kind, view.target.platform, exc)
            except Exception:
                log.exception("sink for %s raised on job %s %s", view.target.platform, view.id, kind)
        await self._observe(event)
        self._on_event(kind, True)

    async def _observe(self, event: JobEvent) -> None:
        for sink in list(self._sinks.get(ANY_PLATFORM, [])):
            try:
                await sink(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("observer raised on job %s %s", event.job.id, event.kind)

    def _forget(self, job_id: int) -> None:
        track = self._tracks.pop(job_id, None)
        if track is not None and track.progress_timer is not None:
            track.progress_timer.cancel()

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking hints; let in-flight sink calls finish (up to ``grace`` s), then cancel them."""
        self._closed = True
        for track in self._tracks.values():
            if track.progress_timer is not None:
                track.progress_timer.cancel()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()
