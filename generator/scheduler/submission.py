"""Admission: a request enters the service here (submit, remix/retry, an input image, the status message of
a job) and is checked once (access, validation, blocked words, storage, quotas) before it is queued.

May touch: the database through ``storage`` repositories, the inputs folder (new input images). Tells the
event hub and the workers about new jobs. See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from generator.engine.extend import last_frame_png
from generator.media import VideoError
from generator.request import USER_FIELDS, GenerationRequest, RequestError, clean_prompt, new_seed, validate
from generator.scheduler import files
from generator.scheduler.admission import admit, check_access, role_of
from generator.scheduler.api import (
    DeliveryTarget,
    JobView,
    Lineage,
    Refusal,
    RefusalCode,
    Requester,
    SubmitResult,
)
from generator.scheduler.community import Communities, CommunityView, channel_list, community_of
from generator.scheduler.core import SchedulerCore
from generator.scheduler.disk import STORAGE_MESSAGE
from generator.scheduler.expand import expand_prompt
from generator.scheduler.filestore import local_copy
from generator.scheduler.image_moderation import BLOCKED_IMAGE_MESSAGE, image_moderator
from generator.scheduler.queue import AGE_OK_KEY
from storage import repo_audit, repo_files, repo_jobs, repo_quotas, repo_users
from storage.db import db_now
from storage.models import Job

log = logging.getLogger("turbobot.scheduler")

BLOCKED_PROMPT_MESSAGE = "Your prompt was blocked by this bot's content rules. Please rephrase it."


def where_of(target: DeliveryTarget) -> str:
    """A delivery target as ``platform:guild/chat`` (``platform:chat`` outside a server) for audit rows."""
    return f"{target.platform}:{target.guild_id}/{target.chat_id}" if target.guild_id else (
        f"{target.platform}:{target.chat_id}")


def delivery_of(target: DeliveryTarget, age_ok: bool) -> dict[str, Any]:
    """The stored delivery extras; ``AGE_OK_KEY`` tells the worker's output check that this place allows
    age-restricted content (the policy at submission time)."""
    return {**target.extra, AGE_OK_KEY: True} if age_ok else dict(target.extra)


class Submissions:
    """Submit, remix/retry, save an input image, remember a job's status message."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core
        self._communities = Communities(core)
        # Input images are checked here, in the scheduler's process, always on the CPU.
        self._images = image_moderator(core.settings, "cpu")

    def _age_restricted_ok(self, target: DeliveryTarget, community: CommunityView | None) -> bool:
        """Whether the community's policy allows age-restricted content where ``target`` is."""
        policy = community.policy if community is not None else self._core.settings.moderation.default_policy
        nsfw_place = target.nsfw or (community is not None and community.nsfw_chat)
        return policy == "allow" or (policy == "nsfw_channels" and nsfw_place)

    async def _check_input_image(
        self, sha: str, requester: Requester, target: DeliveryTarget, age_ok: bool
    ) -> None:
        """Refuse an I2V input image the classifier flags (the message does not describe it)."""
        if self._images is None:
            return
        async with self._core.db.read() as s:
            row = await repo_files.get_input(s, sha)
        if row is None:
            return  # _enqueue refuses it with its own message
        path = await asyncio.to_thread(local_copy, self._core.settings, row.path)
        if path is None:
            return
        try:
            labels = await asyncio.to_thread(self._images.blocked_file, path, age_restricted_ok=age_ok)
        except Exception:
            # A broken model must not let images through unchecked, nor crash the request with a traceback.
            log.exception("image moderation failed on input %s; refusing it", sha)
            raise Refusal(RefusalCode.BLOCKED_IMAGE, "Images cannot be checked right now; please try again later.") \
                from None
        if labels:
            await self._audit_moderation("blocked_image", requester, target, "", ",".join(labels), image=sha)
            raise Refusal(RefusalCode.BLOCKED_IMAGE, BLOCKED_IMAGE_MESSAGE)

    async def _check_age_restricted(
        self, prompt: str, requester: Requester, target: DeliveryTarget, community: CommunityView | None
    ) -> None:
        """Age-restricted prompts pass only where the community's policy allows them (default: nowhere)."""
        entry = self._core.nsfw_words.match(prompt)
        if entry is None:
            return
        if self._age_restricted_ok(target, community):
            return
        policy = community.policy if community is not None else self._core.settings.moderation.default_policy
        await self._audit_moderation("nsfw_prompt", requester, target, prompt, entry)
        where = " outside age-restricted channels" if policy == "nsfw_channels" else ""
        raise Refusal(RefusalCode.NSFW_BLOCKED, f"Age-restricted prompts are not allowed here{where}.")

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
            entry = self._core.blocklist.match(req.prompt)
            if entry is not None:  # the refusal never echoes the prompt; moderators see it in the audit log
                await self._audit_moderation("blocked_prompt", requester, target, req.prompt, entry)
                raise Refusal(RefusalCode.BLOCKED_WORDS, BLOCKED_PROMPT_MESSAGE)
            community = await self._communities.for_target(target)
            if community is not None and not self._core.is_owner(requester):
                if not community.enabled:
                    raise Refusal(RefusalCode.COMMUNITY_OFF,
                                  "The video bot is switched off here by this community's admins.")
                if community.channels and target.chat_id not in community.channels:
                    raise Refusal(RefusalCode.CHANNEL_NOT_ALLOWED,
                                  f"Videos can only be made in {channel_list(community.channels)} here.")
            await self._check_age_restricted(req.prompt, requester, target, community)
            age_ok = self._age_restricted_ok(target, community)
            if req.mode == "i2v" and req.image:
                await self._check_input_image(req.image, requester, target, age_ok)
            if req.seed is None:
                req = req.with_seed(new_seed())
            await self._core.require_storage()
            if parent_id is None:  # the prompt's origin is the scheduler's to record (remix/retry keep the parent's)
                req = req.replace(original_prompt=None)
            req = await self._expanded(req, key)
            member_limit = community.daily_limit if community is not None else 0
            job_id, duplicate = await self._enqueue(req, requester, target, key, parent_id, lineage, member_limit,
                                                    age_ok=age_ok)
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

    async def _expanded(self, req: GenerationRequest, key: str) -> GenerationRequest:
        """``req`` with its prompt rewritten by the expansion endpoint when asked for and usable."""
        if not req.expand or not self._core.settings.expand.url:
            return req
        async with self._core.db.read() as s:
            if await repo_jobs.id_for_key(s, key) is not None:
                return req  # a repeated click: the stored job is returned, no need to ask the endpoint
        limits = self._core.settings.request_limits
        better = await expand_prompt(self._core.settings.expand, req.prompt, limits.max_prompt_chars)
        if better is None or better == req.prompt:
            return req
        if self._core.blocklist.match(better) is not None:
            log.warning("prompt expansion produced a blocked word; using the prompt as typed")
            return req
        return req.replace(prompt=better, original_prompt=req.original_prompt or req.prompt)

    async def _enqueue(
        self, req: GenerationRequest, requester: Requester, target: DeliveryTarget, key: str, parent_id: int | None,
        lineage: Lineage = "", member_limit: int = 0, *, age_ok: bool = False,
    ) -> tuple[int, bool]:
        role = role_of(self._core.settings, requester.key)
        try:
            async with self._core.db.write() as s:
                now = await db_now(s)  # the quota day is the database's, whichever host submits
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
                await admit(s, self._core.settings, user, role, target, now,
                            community=(community_of(target), member_limit))
                job_id = await repo_jobs.insert_job(
                    s, user=user, idempotency_key=key, request=req, platform=target.platform,
                    chat_id=target.chat_id, guild_id=target.guild_id, status_message_id=target.status_message_id,
                    reply_to_message_id=target.reply_to_message_id, delivery=delivery_of(target, age_ok), parent_id=parent_id,
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

    async def _audit_moderation(
        self, action: str, requester: Requester, target: DeliveryTarget, prompt: str, entry: str, **extra: Any
    ) -> None:
        """A moderation event for the console's queue: who, where, what matched and the prompt (moderators only)."""
        detail = json.dumps({
            "who": requester.key, "name": requester.display_name, "where": where_of(target),
            "platform": target.platform, "guild": target.guild_id, "chat": target.chat_id,
            "entry": entry, "prompt": prompt, **extra,
        })
        try:
            async with self._core.db.write() as s:
                user = await repo_users.find_user(s, requester.platform, requester.user_id)
                await repo_audit.add_audit(s, action, user_id=user.id if user else None, detail=detail)
        except Exception:
            log.exception("could not write a moderation event to the audit log")

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
        self._may_use(parent, requester, target, "remixed")
        changes = dict(overrides or {})
        bad = sorted(set(changes) - set(USER_FIELDS))
        if bad:
            raise Refusal(RefusalCode.INVALID, f"'{bad[0]}' cannot be changed in a remix.")
        if new_seed:
            changes["seed"] = None
        if "prompt" in changes and changes["prompt"] != parent.request.prompt:
            changes["original_prompt"] = None  # a new prompt: whatever expansion does next starts from it
        try:
            request = parent.request.replace(**changes)
        except (RequestError, TypeError) as exc:
            raise Refusal(RefusalCode.INVALID, getattr(exc, "message", str(exc))) from None
        # A Retry is the same request with a fresh seed; anything changed makes it a remix.
        lineage: Lineage = "retry" if new_seed and not changes.keys() - {"seed"} else "remix"
        return await self._submit(request, requester, target, idempotency_key, parent_id=parent_id, lineage=lineage)

    def _may_use(self, parent: Job, requester: Requester, target: DeliveryTarget, verb: str) -> None:
        mine = parent.user.platform == requester.platform and parent.user.platform_user_id == requester.user_id
        same_chat = bool(parent.chat_id) and (parent.platform, parent.chat_id) == (target.platform, target.chat_id)
        if not (mine or same_chat or self._core.is_moderator(requester)):
            # Only what was posted where you are: job ids are guessable, other people's DMs are private.
            raise Refusal(RefusalCode.FORBIDDEN, f"Job #{parent.id} was not posted here, so it cannot be {verb} here.")

    async def extend(
        self,
        parent_id: int,
        requester: Requester,
        target: DeliveryTarget,
        idempotency_key: str,
        *,
        prompt: str | None = None,
    ) -> SubmitResult:
        async with self._core.db.read() as s:
            parent = await repo_jobs.get_job(s, parent_id)
        if parent is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"Job #{parent_id} does not exist (any more).")
        self._may_use(parent, requester, target, "extended")
        models = self._core.settings.request_limits.i2v_models
        if not models:
            raise Refusal(
                RefusalCode.MODEL_NOT_CONFIGURED,
                "Extend continues a video with an image-to-video model, and none is configured on this server.",
            )
        if parent.state != "succeeded" or parent.output is None:
            why = {"failed": "failed", "cancelled": "was cancelled"}.get(parent.state, "is not finished yet")
            raise Refusal(RefusalCode.INVALID, f"Job #{parent_id} {why}, so there is no video to extend.")
        video = Path(parent.output.path)
        try:
            png, width, height = await asyncio.to_thread(last_frame_png, video)
        except (OSError, VideoError) as exc:
            log.warning("cannot take the last frame of job %s (%s): %s", parent_id, video, exc)
            raise Refusal(RefusalCode.NOT_FOUND, f"The video of job #{parent_id} is no longer stored.") from None
        image = await self.save_input(requester, png, width, height)
        base = parent.request
        text = clean_prompt(prompt or "")
        request = base.replace(
            mode="i2v", image=image, model=None, seed=base.seed, adaptive_resolution=True, extends=parent_id,
            sigma_max=None if base.mode != "i2v" else base.sigma_max,
            boundary=base.boundary if base.mode == "i2v" else self._core.settings.defaults.boundary,
            **({"prompt": text, "original_prompt": None} if text else {}),
        )
        return await self._submit(request, requester, target, idempotency_key, parent_id=parent_id, lineage="extend")

    async def save_input(self, requester: Requester, png_bytes: bytes, width: int, height: int) -> str:
        await self._core.require_storage()
        sha = await asyncio.to_thread(lambda: hashlib.sha256(png_bytes).hexdigest())
        try:
            store = self._core.store
            if store.kind == "local":
                path = str(await asyncio.to_thread(files.write_atomic, self._core.inputs_dir, f"{sha}.png", png_bytes))
            else:  # remote workers read it from the object store
                path = await asyncio.to_thread(store.put_bytes, "inputs", f"{sha}.png", png_bytes)
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
