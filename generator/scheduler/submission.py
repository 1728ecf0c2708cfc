"""Admission: a request enters the service here (submit, remix/retry, an input image, the status message of
a job) and is checked once (access, validation, blocked words, storage, quotas) before it is queued.

May touch: the database through ``storage`` repositories, the inputs folder (new input images). Tells the
event hub and the workers about new jobs. See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

from sqlalchemy.exc import IntegrityError

from generator.request import USER_FIELDS, GenerationRequest, RequestError, new_seed, validate
from generator.scheduler import files
from generator.scheduler.admission import admit, blocked_word, check_access, role_of
from generator.scheduler.api import (
    DeliveryTarget,
    JobView,
    Lineage,
    Refusal,
    RefusalCode,
    Requester,
    SubmitResult,
)
from generator.scheduler.core import SchedulerCore
from generator.scheduler.disk import STORAGE_MESSAGE
from storage import repo_audit, repo_files, repo_jobs, repo_quotas, repo_users
from storage.models import Job, utcnow

log = logging.getLogger("turbobot.scheduler")


class Submissions:
    """Submit, remix/retry, save an input image, remember a job's status message."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    async def _get(self, job_id: int) -> JobView | None:
        async with self._core.db.read() as s:
            job = await repo_jobs.get_job(s, job_id)
        return None if job is None else await self._core.cache.view_of(job)

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
            check_access(self._core.settings, requester)
            if self._core.workers_failed.is_set():
                # Details (paths, library errors) go to the operator's log and /readyz, not to chat users.
                raise Refusal(
                    RefusalCode.ENGINE_UNAVAILABLE,
                    "The video engine is not available right now (the server's model failed to load). "
                    "The operator has been told; please try again later.",
                )
            try:  # the one validation of a request: every front end and remix enters here
                req = validate(request, self._core.settings.request_limits, role_of(self._core.settings, requester.key))
            except RequestError as exc:
                raise Refusal(RefusalCode.INVALID, exc.message) from None
            word = blocked_word(self._core.settings, req.prompt)
            if word is not None:
                raise Refusal(RefusalCode.BLOCKED_WORDS, "That prompt contains words this bot does not accept.")
            if req.seed is None:
                req = req.with_seed(new_seed())
            await self._core.require_storage()
            job_id, duplicate = await self._enqueue(req, requester, target, key, parent_id, lineage)
        except Refusal as refusal:
            await self._audit_refusal(requester, refusal, request)
            raise
        if not duplicate:
            self._core.cache.invalidate_queue()
            self._core.wake_workers()
        view = await self._get(job_id)
        if view is None:  # deleted in between (e.g. /forget): nothing sensible to return
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{job_id} does not exist (any more).", job_id=job_id)
        if not duplicate:
            self._core.hub.wake(job_id, view)  # the "queued" event, without loading the job again
        return SubmitResult(view, duplicate=duplicate)

    async def _enqueue(
        self, req: GenerationRequest, requester: Requester, target: DeliveryTarget, key: str, parent_id: int | None,
        lineage: Lineage = "",
    ) -> tuple[int, bool]:
        now = utcnow()
        role = role_of(self._core.settings, requester.key)
        try:
            async with self._core.db.write() as s:
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
                await admit(s, self._core.settings, user, role, target, now)
                job_id = await repo_jobs.insert_job(
                    s, user=user, idempotency_key=key, request=req, platform=target.platform,
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
            async with self._core.db.read() as s:
                existing = await repo_jobs.id_for_key(s, key)
            if existing is None:
                raise
            return existing, True

    async def _audit_refusal(self, requester: Requester, refusal: Refusal, request: GenerationRequest) -> None:
        try:
            async with self._core.db.write() as s:
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
        async with self._core.db.read() as s:
            parent = await repo_jobs.get_job(s, parent_id)
        if parent is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{parent_id} does not exist (any more).")
        mine = parent.user.platform == requester.platform and parent.user.platform_user_id == requester.user_id
        same_chat = bool(parent.chat_id) and (parent.platform, parent.chat_id) == (target.platform, target.chat_id)
        if not (mine or same_chat or self._core.is_moderator(requester)):
            # Only what was posted where you are: job ids are guessable, other people's DMs are private.
            raise Refusal(RefusalCode.FORBIDDEN, f"Job #{parent_id} was not posted here, so it cannot be remixed here.")
        changes = dict(overrides or {})
        bad = sorted(set(changes) - set(USER_FIELDS))
        if bad:
            raise Refusal(RefusalCode.INVALID, f"'{bad[0]}' cannot be changed in a remix.")
        if new_seed:
            changes["seed"] = None
        try:
            request = parent.request.replace(**changes)
        except (RequestError, TypeError) as exc:
            raise Refusal(RefusalCode.INVALID, getattr(exc, "message", str(exc))) from None
        # A Retry is the same request with a fresh seed; anything changed makes it a remix.
        lineage: Lineage = "retry" if new_seed and not changes.keys() - {"seed"} else "remix"
        return await self._submit(request, requester, target, idempotency_key, parent_id=parent_id, lineage=lineage)

    async def save_input(self, requester: Requester, png_bytes: bytes, width: int, height: int) -> str:
        await self._core.require_storage()
        sha = await asyncio.to_thread(lambda: hashlib.sha256(png_bytes).hexdigest())
        try:
            path = await asyncio.to_thread(files.write_atomic, self._core.inputs_dir, f"{sha}.png", png_bytes)
        except OSError as exc:  # e.g. the disk filled up between the check and the write
            log.warning("cannot store an input image: %s", exc)
            raise Refusal(RefusalCode.STORAGE_UNAVAILABLE, STORAGE_MESSAGE) from None
        role = role_of(self._core.settings, requester.key)
        async with self._core.db.write() as s:
            user = await repo_users.upsert_user(
                s, requester.platform, requester.user_id, display_name=requester.display_name, role=role
            )
            await repo_files.add_input(
                s, sha256=sha, path=str(path), size=len(png_bytes), width=width, height=height, user_id=user.id
            )
        return sha

    async def set_status_message(self, job_id: int, message_id: str, extra: dict[str, Any] | None = None) -> None:
        async with self._core.db.write() as s:
            await repo_jobs.set_status_message(s, job_id, message_id, extra)
