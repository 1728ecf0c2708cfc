"""The Discord event sink: one status message per job, edited in place (throttled), then the result.

While the interaction token lives (15 minutes) the status message is edited through the interaction
webhook; after that, or on 401/50027, the bot token is used: status edits go to the channel message and
the result is posted as a reply that mentions the user. Terminal events raise on transient failures so
the scheduler offers them again (also after a restart); permanent ones (no access) are logged and dropped.

Live previews ride on the status edits: a new preview (``JobView.preview_version``) is attached to the status
message as ``preview.gif`` (Discord plays a GIF attachment inline and looping; an mp4 would need a click),
within the same throttle as the text (Discord allows about 5 edits per 5 s per channel). The result, or the
end of the job, replaces the attachments, so the preview goes when the video comes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord

from bots.discord.buttons import job_buttons
from bots.discord.media import UPLOAD_HEADROOM, Upload, prepare_upload
from bots.previews import PREVIEW_FILENAME, read_preview
from bots.texts import result_caption, status_text
from generator.scheduler.api import DeliverLater, JobEvent, JobView

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

log = logging.getLogger(__name__)

FINISHED_KEPT = 1000  # recently finished jobs whose late progress edits are dropped
GATE_TIMEOUT_S = 30.0  # how long a terminal event waits for the first answer to its interaction
_TOKEN_DEAD_CODES = (50027, 10015)  # invalid webhook token, unknown webhook


class TooLarge(Exception):
    """Discord refused the upload as too large (our idea of the limit was wrong)."""


class Delivery:
    def __init__(self, bot: TurboBot) -> None:
        self.bot = bot
        self.interval = bot.settings.discord.status_interval_seconds
        self._gates: dict[str, asyncio.Event] = {}
        self._status_ids: dict[int, str] = {}
        self._last_edit: dict[int, float] = {}
        self._last_text: dict[int, str] = {}
        self._latest: dict[int, JobView] = {}
        self._preview_version: dict[int, int] = {}  # the preview version last shown (or given up on) per job
        self._no_previews: set[int] = set()  # jobs whose channel refused a preview as too large
        self._pending: dict[int, asyncio.Task[None]] = {}
        self._dead_tokens: set[str] = set()
        # One edit of a job's message at a time, and none after its result: a progress edit still in flight
        # when the job ends would otherwise land after the result and put "Rendering" back on it.
        self._locks: dict[int, asyncio.Lock] = {}
        self._finished: collections.OrderedDict[int, None] = collections.OrderedDict()

    # --- bookkeeping shared with the interaction handlers -------------------------------------
    def open_gate(self, interaction_id: str) -> asyncio.Event:
        """Events of a job wait until its interaction has been answered (the status message exists)."""
        gate = self._gates[interaction_id] = asyncio.Event()
        return gate

    def close_gate(self, interaction_id: str) -> None:
        gate = self._gates.pop(interaction_id, None)
        if gate is not None:
            gate.set()

    def remember(self, job_id: int, message_id: str, text: str) -> None:
        """The status message of a job (and what it shows, so an identical edit is skipped)."""
        self._status_ids[job_id] = message_id
        self._last_text.setdefault(job_id, text)

    def _status_id(self, job: JobView) -> str | None:
        return self._status_ids.get(job.id) or job.target.status_message_id or None

    async def _wait_gate(self, job: JobView) -> bool:
        gate = self._gates.get(str(job.target.extra.get("interaction_id", "")))
        if gate is None or gate.is_set():
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gate.wait(), GATE_TIMEOUT_S)
        return True

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _mark_finished(self, job_id: int) -> None:
        self._finished[job_id] = None
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    def _forget(self, job_id: int) -> None:
        self._locks.pop(job_id, None)  # waiters keep their reference; they find the job finished
        task = self._pending.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._no_previews.discard(job_id)
        for d in (self._status_ids, self._last_edit, self._last_text, self._latest, self._preview_version):
            d.pop(job_id, None)

    async def drain(self, within: float) -> None:
        """Wait (bounded) until interactions being answered now have their status message stored."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._gates and loop.time() < deadline:
            waits = [asyncio.ensure_future(g.wait()) for g in list(self._gates.values())]
            try:
                await asyncio.wait(waits, timeout=deadline - loop.time(), return_when=asyncio.ALL_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        self._pending.clear()

    # --- the sink -----------------------------------------------------------------------------
    async def __call__(self, event: JobEvent) -> None:
        if self.bot.is_closed():
            raise DeliverLater("the Discord client is closed")
        job = event.job
        if not event.terminal:
            await self._status(job)
            return
        task = self._pending.pop(job.id, None)
        if task is not None:
            task.cancel()
        waited = await self._wait_gate(job)
        if waited or not self._status_id(job):
            fresh = await self.bot.scheduler.views.get(job.id)  # picks up the status message id stored since
            if fresh is not None and fresh.state == job.state:
                job = fresh
        try:
            async with self._lock(job.id):
                self._mark_finished(job.id)
                if event.kind == "succeeded" and job.output is not None:
                    await self._deliver_result(job)
                else:
                    await self._deliver_end(job)
        finally:
            self._forget(job.id)

    # --- status edits -------------------------------------------------------------------------
    async def _status(self, job: JobView) -> None:
        if job.id in self._finished:
            return
        self._latest[job.id] = job
        if job.id in self._pending:
            return  # a scheduled edit will show the newest snapshot
        loop = asyncio.get_running_loop()
        gate = self._gates.get(str(job.target.extra.get("interaction_id", "")))
        delay = self._last_edit.get(job.id, -1e18) + self.interval - loop.time()
        if delay <= 0 and (gate is None or gate.is_set()):
            await self._edit_status(job.id)
        else:
            self._pending[job.id] = asyncio.create_task(self._edit_later(job.id, max(delay, 0.0), gate))

    async def _edit_later(self, job_id: int, delay: float, gate: asyncio.Event | None) -> None:
        if gate is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.wait(), GATE_TIMEOUT_S)
        await asyncio.sleep(delay)
        self._pending.pop(job_id, None)
        await self._edit_status(job_id)

    async def _edit_status(self, job_id: int) -> None:
        async with self._lock(job_id):
            if job_id not in self._finished:
                await self._edit_status_now(job_id)

    async def _edit_status_now(self, job_id: int) -> None:
        job = self._latest.get(job_id)
        mid = self._status_id(job) if job else None
        if job is None or mid is None:
            return
        text = status_text(job, "discord")
        new_preview = (self.bot.settings.scheduler.previews and bool(job.preview)
                       and job_id not in self._no_previews
                       and job.preview_version > self._preview_version.get(job_id, 0))
        if self._last_text.get(job_id) == text and not new_preview:
            return
        self._last_edit[job_id] = asyncio.get_running_loop().time()
        self._last_text[job_id] = text
        preview = None
        if new_preview:
            self._preview_version[job_id] = job.preview_version  # shown or given up on: never retried in a loop
            preview = await read_preview(self.bot.settings, job.preview)
            limit = int(job.target.extra.get("upload_limit") or self.bot.settings.discord.default_upload_limit_bytes)
            if preview is not None and len(preview) > limit - UPLOAD_HEADROOM:
                preview = None  # a preview must never cost the status edit: skip what the channel cannot take

        def fields(with_preview: bool) -> dict[str, Any]:  # fresh each time: a discord.File is consumed once
            out: dict[str, Any] = {"content": text, "view": job_buttons(job)}
            if with_preview and preview is not None:
                out["attachments"] = [discord.File(io.BytesIO(preview), filename=PREVIEW_FILENAME)]
            return out

        try:
            try:
                if not await self._edit_with_token(job, mid, **fields(True)):
                    await self._edit_with_bot(job, mid, **fields(True))
            except (TooLarge, discord.HTTPException) as exc:
                too_large = isinstance(exc, TooLarge) or exc.status == 413 or exc.code == 40005
                if preview is None or not too_large:
                    raise
                # The channel's real limit is below what Discord announced: no more previews for this job.
                self._no_previews.add(job_id)
                log.info("job %s: Discord refused the live preview as too large; previews off for this job", job.id)
                if not await self._edit_with_token(job, mid, **fields(False)):
                    await self._edit_with_bot(job, mid, **fields(False))
        except TooLarge:
            log.info("job %s: status edit refused as too large", job.id)
        except discord.HTTPException as exc:  # a missed progress edit is harmless; the next one may work
            log.info("job %s: status edit failed (%s %s)", job.id, exc.status, exc.code)
        except (OSError, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:  # network, closing client
            log.info("job %s: status edit failed (%s)", job.id, exc)

    # --- the two ways to reach a message --------------------------------------------------------
    def _token_usable(self, job: JobView) -> bool:
        extra = job.target.extra
        return (
            bool(extra.get("interaction_token") and extra.get("application_id"))
            and time.time() < float(extra.get("token_expires_at", 0))
            and str(extra.get("interaction_id")) not in self._dead_tokens
        )

    async def _edit_with_token(self, job: JobView, message_id: str, **fields: Any) -> bool:
        """Edit through the interaction webhook; False when the token cannot be used (then use the bot)."""
        if not self._token_usable(job):
            return False
        extra = job.target.extra
        webhook = discord.Webhook.partial(int(extra["application_id"]), str(extra["interaction_token"]),
                                          client=self.bot)
        try:
            await webhook.edit_message(int(message_id), **fields)
        except discord.HTTPException as exc:
            if exc.status == 401 or exc.code in _TOKEN_DEAD_CODES:
                self._dead_tokens.add(str(extra.get("interaction_id")))
                log.info("job %s: interaction token no longer valid, using the bot token", job.id)
                return False
            if exc.status == 404:  # the status message was deleted: post a new one instead
                return False
            if exc.status == 413 or exc.code == 40005:
                raise TooLarge from exc
            raise
        return True

    async def _edit_with_bot(self, job: JobView, message_id: str, **fields: Any) -> None:
        channel = self.bot.get_partial_messageable(int(job.target.chat_id))
        await channel.get_partial_message(int(message_id)).edit(**fields)

    async def _reply(self, job: JobView, content: str, upload: Upload | None, view: discord.ui.View | None) -> None:
        """A new channel message with the bot token: mentions the user, replies to the status message."""
        if not job.target.chat_id:
            log.warning("job %s: no channel to deliver to", job.id)
            return
        channel = self.bot.get_partial_messageable(int(job.target.chat_id))
        mid = self._status_id(job)
        reference = (discord.MessageReference(message_id=int(mid), channel_id=int(job.target.chat_id),
                                              fail_if_not_exists=False) if mid else None)
        user = discord.Object(int(job.requester.user_id))
        kwargs: dict[str, Any] = {
            "content": f"<@{job.requester.user_id}> {content}"[:2000],
            "allowed_mentions": discord.AllowedMentions(everyone=False, roles=False, users=[user]),
        }
        if reference is not None:
            kwargs["reference"] = reference
        if view is not None:
            kwargs["view"] = view
        file = discord.File(upload.path, filename=upload.filename) if upload and upload.path else None
        if file is not None:
            kwargs["file"] = file
        try:
            await channel.send(**kwargs)
        except (discord.Forbidden, discord.NotFound) as exc:
            # No access to the channel (e.g. the bot was removed): retrying will not help.
            log.warning("job %s: cannot post in channel (%s %s); giving up", job.id, exc.status, exc.code)
        except discord.HTTPException as exc:
            if exc.status == 413 or exc.code == 40005:
                raise TooLarge from exc
            raise
        finally:
            if file is not None:
                file.close()

    # --- terminal deliveries ------------------------------------------------------------------
    async def _deliver_result(self, job: JobView) -> None:
        limit = int(job.target.extra.get("upload_limit") or self.bot.settings.discord.default_upload_limit_bytes)
        view = job_buttons(job)
        with tempfile.TemporaryDirectory(prefix="turbobot-discord-") as tmp:
            upload = await prepare_upload(job, limit, Path(tmp), settings=self.bot.settings)
            try:
                await self._send_result(job, upload, view)
            except TooLarge:
                log.info("job %s: Discord refused %s as too large; sending a preview", job.id, upload.filename)
                upload = await prepare_upload(job, limit, Path(tmp), force_preview=True, settings=self.bot.settings)
                try:
                    await self._send_result(job, upload, view)
                except TooLarge:
                    if upload.path is None:
                        raise
                    # Not even the first frame fits what Discord accepts now: the caption and the note alone.
                    log.info("job %s: Discord refused the preview too; sending the caption alone", job.id)
                    note = upload.note.replace(", so here is its first frame;", ";")
                    await self._send_result(job, Upload(None, f"turbobot-{job.id}.mp4", note), view)

    async def _send_result(self, job: JobView, upload: Upload, view: discord.ui.View) -> None:
        content = result_caption(job, "discord")
        if upload.note:
            content += "\n" + upload.note
        mid = self._status_id(job)
        if mid is not None and self._token_usable(job):
            file = discord.File(upload.path, filename=upload.filename) if upload.path else None
            try:
                done = await self._edit_with_token(job, mid, content=content, view=view,
                                                   attachments=[file] if file else [])
            finally:
                if file is not None:
                    file.close()
            if done:
                return
        # Token expired or refused: reply in the channel with the bot token, and mark the status message done.
        await self._reply(job, content, upload, view)
        if mid is not None:
            with contextlib.suppress(discord.HTTPException):
                await self._edit_with_bot(job, mid, content=status_text(job, "discord"), view=None, attachments=[])

    async def _deliver_end(self, job: JobView) -> None:
        """Failed or cancelled: the status message says so (with Retry); a reply only if it cannot be edited."""
        content = status_text(job, "discord")
        view = job_buttons(job)
        mid = self._status_id(job)
        if mid is not None:  # attachments=[]: a live preview shown on the status message goes
            if await self._edit_with_token(job, mid, content=content, view=view, attachments=[]):
                return
            try:
                await self._edit_with_bot(job, mid, content=content, view=view, attachments=[])
                return
            except discord.HTTPException as exc:
                log.info("job %s: cannot edit the status message (%s %s)", job.id, exc.status, exc.code)
        await self._reply(job, content, None, view)
