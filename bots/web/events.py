"""Live job status for the browser over server-sent events.

The scheduler pushes events for jobs submitted from the console (platform "web") to ``StreamHub.sink``;
every open stream of that job is woken at once. Streams also re-read the job from the scheduler every
``poll_seconds``, which covers jobs from the chat platforms (their events go to the bots) and queue
positions that move because other jobs started.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from bots.web.serialize import job_json
from generator.scheduler.api import JobEvent, JobView, SchedulerAPI

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
ETA_GRAIN_S = 5.0  # an ETA that moves less than this is not resent


class StreamHub:
    """Fans a job's events out to the browser streams watching it (the console's side of the scheduler's hub)."""

    def __init__(self) -> None:
        self._watchers: dict[int, set[asyncio.Queue[JobView]]] = defaultdict(set)
        self.closing = asyncio.Event()

    async def sink(self, event: JobEvent) -> None:
        """The scheduler's EventSink for platform "web": never blocks, never raises for a slow browser."""
        for queue in list(self._watchers.get(event.job.id, ())):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # keep the newest state only
            queue.put_nowait(event.job)

    @contextlib.contextmanager
    def watch(self, job_id: int) -> Iterator[asyncio.Queue[JobView]]:
        queue: asyncio.Queue[JobView] = asyncio.Queue(maxsize=8)
        self._watchers[job_id].add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]

    def watcher_count(self) -> int:
        return sum(len(v) for v in self._watchers.values())


async def _pump(
    request: web.Request,
    response: web.StreamResponse,
    scheduler: SchedulerAPI,
    hub: StreamHub,
    job: JobView,
    poll_seconds: float,
) -> None:
    """Write the job's state whenever it changes, until it is terminal, deleted or the app shuts down."""
    loop = asyncio.get_running_loop()
    last = ""
    last_write = loop.time()
    with hub.watch(job.id) as queue:
        while True:
            data = job_json(job)
            fp = _fingerprint(data)
            if fp != last:
                await response.write(f"event: job\ndata: {json.dumps(data)}\n\n".encode())
                last, last_write = fp, loop.time()
            elif loop.time() - last_write >= KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                last_write = loop.time()
            if data["terminal"]:
                await response.write(b"event: end\ndata: {}\n\n")
                return
            transport = request.transport
            if hub.closing.is_set() or transport is None or transport.is_closing():
                return  # shutting down, or the browser has gone
            with contextlib.suppress(TimeoutError):
                # Woken early by the scheduler's event for this job; either way re-read the job, since
                # queue positions move without an event of this job.
                await asyncio.wait_for(queue.get(), timeout=poll_seconds)
            fresh = await scheduler.views.get(job.id)
            if fresh is None:  # deleted meanwhile
                await response.write(b"event: gone\ndata: {}\n\n")
                return
            job = fresh


def _fingerprint(data: dict[str, Any]) -> str:
    """What makes a state worth sending: status_text holds a relative "in about N s" and the ETA is
    recomputed on every read, so they are left out or coarsened (the page counts down by itself)."""
    slim = {k: v for k, v in data.items() if k not in ("status_text", "eta")}
    eta = data.get("eta")
    if eta:
        slim["eta"] = round(dt.datetime.fromisoformat(eta).timestamp() / ETA_GRAIN_S)
    return json.dumps(slim, sort_keys=True, default=str)


async def stream_job(
    request: web.Request, scheduler: SchedulerAPI, hub: StreamHub, job_id: int, *, poll_seconds: float
) -> web.StreamResponse:
    job = await scheduler.views.get(job_id)
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "not_found", "message": f"There is no job #{job_id}."}),
                               content_type="application/json")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        await _pump(request, response, scheduler, hub, job, poll_seconds)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the browser went away (page closed or navigated): nothing more to send
    return response
