"""Read-only views of the service: a job, a user's jobs and queue, waiting for a job, readiness
(``JobViews``); and the listings the web console and the CLI need across every user (``Listings``).

Nothing here writes. Views with queue position and ETA go through the one ``ViewCache``; all SQL is in
``storage`` (``repo_jobs``, ``repo_listings``, ``repo_users``). See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

from generator.scheduler.admission import quota_view, role_of
from generator.scheduler.api import TERMINAL_KINDS, JobView, QuotaView, Refusal, RefusalCode, Requester
from generator.scheduler.core import SchedulerCore
from generator.scheduler.health import Readiness, readiness
from generator.scheduler.views import job_view
from storage import repo_audit, repo_files, repo_jobs, repo_listings, repo_users
from storage.db import db_now
from storage.models import JOB_STATES
from storage.repo_listings import MAX_PAGE, FinishedRow, JobFilters, UserSummary, WorkerRow

__all__ = [
    "JOB_STATES", "MAX_PAGE", "FinishedRow", "JobFilters", "JobViews", "Listings", "UserSummary", "WorkerRow",
]


# Audit actions the console's moderation page lists.
MODERATION_ACTIONS = ("blocked_prompt", "nsfw_prompt", "blocked_image", "blocked_output", "released_output",
                      "deleted_held", "expired_held", "community_settings")

class JobViews:
    """What one requester (or the operator) may look at; every answer is a ``JobView`` with position/ETA."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    async def get(self, job_id: int) -> JobView | None:
        async with self._core.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        return None if job is None else await self._core.cache.view_of(job)

    async def wait(self, job_id: int, *, stop_on_worker_error: bool = False) -> JobView:
        """Until job ``job_id`` is terminal (independent of sinks and delivery); for the CLI and tests.
        Bound it with ``async with asyncio.timeout(...)``. ``stop_on_worker_error``: raise
        ``Refusal(RefusalCode.ENGINE_UNAVAILABLE)`` when every local worker has failed to load its engine."""
        hub = self._core.hub
        fut = hub.add_waiter(job_id)
        failed: asyncio.Future[Any] | None = None
        try:
            view = await self.get(job_id)
            if view is None:
                raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
            if view.state in TERMINAL_KINDS:
                return view
            hub.wake(job_id)
            if not stop_on_worker_error:
                return await fut
            failed = asyncio.ensure_future(self._core.workers_failed.wait())
            await asyncio.wait({fut, failed}, return_when=asyncio.FIRST_COMPLETED)
            if fut.done():
                return fut.result()
            errors = "; ".join(sorted(set(self.worker_errors().values())))
            raise Refusal(RefusalCode.ENGINE_UNAVAILABLE, f"The video engine could not start: {errors}", job_id=job_id)
        finally:
            if failed is not None:
                failed.cancel()
            hub.remove_waiter(job_id, fut)

    async def jobs_for(
        self, requester: Requester, *, limit: int = 10, states: tuple[str, ...] | None = None, query: str = ""
    ) -> list[JobView]:
        async with self._core.db.read() as s:
            user = await repo_users.find_user(s, requester.platform, requester.user_id)
            if user is None:
                return []
            jobs = await repo_jobs.list_user_jobs(s, user.id, limit=limit, states=states, query=query)
        return await self._core.cache.views_of(jobs)

    async def queue_info(self, requester: Requester) -> tuple[list[JobView], QuotaView, int]:
        core = self._core
        role = role_of(core.settings, requester.key)
        async with core.db.read() as s:
            now = await db_now(s)  # the quota day and its reset by the database's clock
            user = await repo_users.find_user(s, requester.platform, requester.user_id)
            quota = await quota_view(s, core.settings, user, role, now)
            jobs = (
                await repo_jobs.list_user_jobs(s, user.id, limit=100, states=("queued", "running"))
                if user is not None
                else []
            )
        views = await core.cache.views_of(jobs)
        snap = await core.cache.snapshot()
        views.sort(key=lambda v: (v.state != "running", v.position or 0, v.id))
        return views, quota, snap.length

    async def storage_problem(self) -> str:
        """"" when new videos and inputs can be stored, else why not (for the operator)."""
        return await self._core.storage_problem()

    async def readiness(self) -> Readiness:
        """The one readiness check (also what /readyz and ``turbobot ready`` answer)."""
        return await readiness(self._core.settings, self._core.db)

    def worker_errors(self) -> dict[str, str]:
        """worker id -> why its engine failed to load (empty while every worker loads fine)."""
        sup = self._core.supervisor
        return {} if sup is None else {h.worker_id: h.error for h in sup.handles if h.error}

    def workers_loading(self) -> bool:
        """Local workers exist and none serves yet (loading the engine): front ends say so while waiting."""
        sup = self._core.supervisor
        return sup is not None and not any(h.state in ("idle", "busy") for h in sup.handles)


class Listings:
    """Read-only listings across every user and platform, for the web console and the CLI. Jobs come without
    queue position/ETA (the admin queue adds positions through ``JobViews``)."""

    def __init__(self, core: SchedulerCore) -> None:
        self._db = core.db

    async def jobs(
        self, filters: JobFilters = JobFilters(), *, limit: int = 30, before_id: int | None = None
    ) -> list[JobView]:
        """Newest first."""
        async with self._db.read() as s:
            rows = await repo_listings.list_jobs(s, filters, limit=limit, before_id=before_id)
        return [job_view(j, user=u, output=o) for j, u, o in rows]

    async def job(self, job_id: int) -> JobView | None:
        async with self._db.read() as s:
            row = await repo_listings.get_job_row(s, job_id)
        return None if row is None else job_view(row[0], user=row[1], output=row[2])

    async def children_of(self, job_id: int, *, limit: int = 50) -> list[JobView]:
        async with self._db.read() as s:
            rows = await repo_listings.children_of(s, job_id, limit=limit)
        return [job_view(j, user=u, output=o) for j, u, o in rows]

    async def media_paths(self, job_id: int) -> tuple[str | None, str | None]:
        """(output video path, input image path) of a job; None when absent."""
        async with self._db.read() as s:
            return await repo_listings.media_paths(s, job_id)

    async def held_path(self, job_id: int) -> str | None:
        """Where the video the moderation model held for this job is stored (for an admin's preview)."""
        async with self._db.read() as s:
            held = await repo_files.get_held(s, job_id)
        return None if held is None else held.path

    async def active_jobs(self, *, limit: int = MAX_PAGE) -> list[JobView]:
        """Running first, then queued oldest first."""
        async with self._db.read() as s:
            rows = await repo_listings.active_jobs(s, limit=limit)
        return [job_view(j, user=u, output=o) for j, u, o in rows]

    async def users(self, *, query: str = "", day: str | None = None, limit: int = 100) -> list[UserSummary]:
        async with self._db.read() as s:
            return await repo_listings.user_summaries(s, query=query, day=day, limit=limit)

    async def workers(self) -> list[WorkerRow]:
        async with self._db.read() as s:
            return await repo_listings.workers(s)

    async def state_counts(self) -> dict[str, int]:
        async with self._db.read() as s:
            return await repo_listings.state_counts(s)

    async def finished_since(self, since: dt.datetime | None, *, limit: int = 5000) -> list[FinishedRow]:
        async with self._db.read() as s:
            return await repo_listings.finished_since(s, since, limit=limit)

    async def refusals_after(self, after_id: int, *, limit: int = 5000) -> list[tuple[int, str]]:
        async with self._db.read() as s:
            return await repo_listings.refusals_after(s, after_id, limit=limit)

    async def recent_timings(self, *, limit: int = 30) -> list[tuple[int, dict[str, Any]]]:
        async with self._db.read() as s:
            return await repo_listings.recent_timings(s, limit=limit)

    async def moderation_events(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Blocked prompts, images and held videos, admins' decisions on held videos, and settings changes, newest
        first: who, where, what matched, when. A held video's event says whether it is still ``held``."""
        async with self._db.read() as s:
            rows = await repo_audit.with_actions(s, MODERATION_ACTIONS, limit=limit)
            held = await repo_files.held_job_ids(
                s, [r.job_id for r in rows if r.action == "blocked_output" and r.job_id is not None])
        out = []
        for row in rows:
            try:
                detail = json.loads(row.detail)
            except ValueError:
                detail = {"text": row.detail}
            event = {"id": row.id, "at": row.at.isoformat(), "action": row.action, "user_id": row.user_id,
                     **(detail if isinstance(detail, dict) else {"text": row.detail})}
            if row.action == "blocked_output":
                event["held"] = row.job_id in held  # still waiting for an admin: Release / Delete apply
            out.append(event)
        return out
