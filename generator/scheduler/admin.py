"""Admin actions on jobs and users: cancel, delete, forget (a user's own data), per-user limits, block and
unblock, release or delete a video the moderation model held (and the retention of held videos); and the
role checks front ends use to show admin commands.

May touch: the database through ``storage`` repositories and the outputs/inputs folders (deleting files).
Tells the event hub and the workers (cancel). See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from pathlib import Path

from generator.scheduler import files, queue
from generator.scheduler.admission import role_of
from generator.scheduler.api import TERMINAL_KINDS, JobView, Refusal, RefusalCode, Requester
from generator.scheduler.core import SchedulerCore
from generator.scheduler.reads import JobViews
from storage import repo_audit, repo_files, repo_jobs, repo_users
from storage.db import db_now
from storage.models import Job, utcnow

log = logging.getLogger("turbobot.scheduler")


class AdminActions:
    def __init__(self, core: SchedulerCore, views: JobViews) -> None:
        self._core = core
        self._views = views

    def is_owner(self, requester: Requester) -> bool:
        return self._core.is_owner(requester)

    def is_moderator(self, requester: Requester) -> bool:
        return self._core.is_moderator(requester)

    async def _owned_job(self, job_id: int, requester: Requester) -> Job:
        async with self._core.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        if job is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        mine = job.user.platform == requester.platform and job.user.platform_user_id == requester.user_id
        if not mine and not self._core.is_moderator(requester):
            raise Refusal(RefusalCode.FORBIDDEN, "Only the person who asked for this video (or a moderator) can do that.")
        return job

    async def cancel(self, job_id: int, requester: Requester) -> JobView:
        await self._owned_job(job_id, requester)
        async with self._core.db.write() as s:
            outcome = await queue.cancel(s, job_id, now=utcnow())
        if outcome == "missing":
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        if outcome.startswith("already_"):
            state = outcome.removeprefix("already_")
            raise Refusal(RefusalCode.NOT_CANCELLABLE, f"Job #{job_id} has already finished ({state}).", job_id=job_id)
        if outcome == "requested":
            self._core.cancel_on_workers(job_id)
        self._core.cache.invalidate_queue()
        self._core.hub.wake(job_id)
        view = await self._views.get(job_id)
        assert view is not None
        return view

    async def _remove(self, refs: list[str]) -> None:
        await remove_stored(self._core, refs)

    async def delete(self, job_id: int, requester: Requester) -> None:
        job = await self._owned_job(job_id, requester)
        if job.state not in TERMINAL_KINDS:
            raise Refusal(RefusalCode.NOT_FINISHED, f"Job #{job_id} is still {job.state}; cancel it first.", job_id=job_id)
        async with self._core.db.write() as s:
            paths = await repo_files.output_paths_for_jobs(s, [job_id])
            await repo_jobs.delete_jobs(s, [job_id])
            actor = await repo_users.find_user(s, requester.platform, requester.user_id)
            await repo_audit.add_audit(
                s, "delete", user_id=actor.id if actor else None, detail=f"job {job_id} by {requester.key}"
            )
        await self._remove(paths)

    async def forget(self, requester: Requester) -> int:
        """Delete the requester's jobs, outputs, inputs and audit entries. The user row itself stays
        (anonymised) so blocks and today's quota usage survive a /forget."""
        async with self._core.db.write() as s:
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
        await self._remove(paths)
        for job_id in ids:
            self._core.cancel_on_workers(job_id)  # their workers discard the result (rows are gone)
        self._core.cache.invalidate_queue()
        return len(ids)

    def _require_owner(self, actor: Requester) -> None:
        if not self._core.is_owner(actor):
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
        async with self._core.db.write() as s:
            user = await repo_users.upsert_user(s, platform, uid, role=role_of(self._core.settings, user_key))
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
        async with self._core.db.write() as s:
            user = await repo_users.upsert_user(s, platform, uid, role=role_of(self._core.settings, user_key))
            await repo_users.set_blocked(s, user, True, reason)
            queued = await repo_jobs.list_user_jobs(s, user.id, limit=10_000, states=("queued",))
            for job in queued:
                await queue.cancel(s, job.id, now=now)
            await repo_audit.add_audit(s, "block", user_id=user.id, detail=f"by {actor.key}: {reason}")
        for job in queued:
            self._core.hub.wake(job.id)
        self._core.cache.invalidate_queue()

    # --- videos the moderation model held -------------------------------------------------------
    def _require_moderator(self, actor: Requester) -> None:
        if not self._core.is_moderator(actor):
            raise Refusal(RefusalCode.FORBIDDEN, "Only the bot's owners and moderators can do that.")

    @staticmethod
    def _nothing_held(job_id: int) -> Refusal:
        return Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} has no held video (any more): it was released or "
                                              "deleted already.", job_id=job_id)

    async def release_held(self, job_id: int, actor: Requester) -> JobView:
        """Deliver a held video after all: it becomes the job's output, the job succeeded and undelivered,
        and the event hub sends it to the original chat like any finished job (exactly once)."""
        self._require_moderator(actor)
        async with self._core.db.write() as s:
            now = await db_now(s)
            held = await queue.release_held(s, job_id, now=now)
            if held is None:
                raise self._nothing_held(job_id)
            job = await repo_jobs.get_job(s, job_id)
            detail = {**_who_where(job), "entry": held.labels, "job": job_id, "by": actor.key}
            await repo_audit.add_audit(s, "released_output", user_id=job.user_id if job else None, job_id=job_id,
                                       detail=json.dumps(detail), now=now)
        log.info("job %s: held video released by %s", job_id, actor.key)
        self._core.hub.wake(job_id)
        view = await self._views.get(job_id)
        assert view is not None
        return view

    async def delete_held(self, job_id: int, actor: Requester) -> None:
        """Delete a held video for good (the job stays, failed as held by moderation)."""
        self._require_moderator(actor)
        if not await _drop_held(self._core, job_id, action="deleted_held", by=actor.key):
            raise self._nothing_held(job_id)

    async def unblock(self, actor: Requester, user_key: str) -> None:
        self._require_owner(actor)
        platform, uid = self._split_key(user_key)
        async with self._core.db.write() as s:
            user = await repo_users.find_user(s, platform, uid)
            if user is None:
                return
            await repo_users.set_blocked(s, user, False)
            await repo_audit.add_audit(s, "unblock", user_id=user.id, detail=f"by {actor.key}")


def _who_where(job: Job | None) -> dict[str, str]:
    """Who asked and where it goes, as the moderation queue shows them."""
    if job is None:
        return {}
    where = f"{job.platform}:{job.guild_id}/{job.chat_id}" if job.guild_id else f"{job.platform}:{job.chat_id}"
    user = job.user
    return {"who": f"{user.platform}:{user.platform_user_id}", "name": user.display_name, "where": where,
            "prompt": job.prompt}


async def remove_stored(core: SchedulerCore, refs: list[str]) -> None:
    """Delete stored files through the file store (local paths or objects); a store that is down now
    leaves orphans that the sweep removes later."""
    store = core.store
    if store.kind == "local":
        await asyncio.to_thread(files.remove_files, [Path(p) for p in refs])
        return

    def remove() -> None:
        for ref in refs:
            if store.owns(ref):
                store.delete(ref)

    try:
        await asyncio.to_thread(remove)
    except Exception as exc:  # OSError or the client's own errors
        log.warning("could not delete stored files now (the sweep retries): %s", exc)


async def _drop_held(core: SchedulerCore, job_id: int, *, action: str, by: str) -> bool:
    """Remove a held video's row (audited as ``action``) and then its file; False when nothing was held.
    A file left behind (store down) has no row any more, so the sweep removes it."""
    async with core.db.write() as s:
        now = await db_now(s)
        held = await repo_files.take_held(s, job_id)
        if held is None:
            return False
        job = await repo_jobs.get_job(s, job_id)
        detail = {**_who_where(job), "entry": held.labels, "job": job_id, "by": by}
        await repo_audit.add_audit(s, action, user_id=job.user_id if job else None, job_id=job_id,
                                   detail=json.dumps(detail), now=now)
    await remove_stored(core, [held.path])
    log.info("job %s: held video deleted (%s, %s)", job_id, action, by)
    return True


async def expire_held(core: SchedulerCore) -> int:
    """Delete videos held for longer than ``[moderation] held_days`` (0 keeps them until an admin decides);
    returns how many."""
    days = core.settings.moderation.held_days
    if days <= 0:
        return 0
    async with core.db.read() as s:
        cutoff = await db_now(s) - dt.timedelta(days=days)
        ids = await repo_files.held_before(s, cutoff)
    n = 0
    for job_id in ids:
        n += await _drop_held(core, job_id, action="expired_held", by=f"retention ({days:g} days)")
    return n
