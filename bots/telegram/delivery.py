"""Delivering a finished video: ``send_video`` under the upload limit, else a smaller re-encode, else a
preview frame with a note. The caption says job id, seed, model, steps, time (and the demo note)."""

from __future__ import annotations

import asyncio
import html
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telegram import Bot, Message, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden

from bots.telegram.keyboards import result_keyboard
from bots.texts import result_caption
from generator.scheduler.api import JobView
from generator.scheduler.filestore import is_remote, local_copy
from turbobot.config import Settings

log = logging.getLogger(__name__)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def output_path(settings: Settings, job: JobView) -> Path | None:
    if job.output is None:
        return None
    return settings.path(job.output.path)


def reply_to(job: JobView) -> ReplyParameters | None:
    if not job.target.reply_to_message_id:
        return None
    # The command may have been deleted meanwhile: deliver anyway.
    return ReplyParameters(int(job.target.reply_to_message_id), allow_sending_without_reply=True)


@dataclass(frozen=True)
class _Payload:
    kind: str  # "video", "preview", "note" (text only) or "missing"
    data: bytes = b""
    note: str = ""


def _fetch(settings: Settings, job: JobView) -> Path | None:
    """The output as a local file: the file itself, or a copy from the object store (blocking)."""
    if job.output is not None and is_remote(job.output.path):
        return local_copy(settings, job.output.path)
    return output_path(settings, job)


def _prepare(src: Path | None, tmp: Path, limit: int) -> _Payload:
    """Blocking file work (stat, ffmpeg re-encode, reading up to the upload limit): run in a thread."""
    if src is None or not src.is_file():
        return _Payload("missing")
    size = src.stat().st_size
    if size <= limit:
        return _Payload("video", src.read_bytes())
    from generator.media import fit_to_size, thumbnail  # ffmpeg helpers, needed only here

    try:
        fitted = fit_to_size(src, tmp / "fit.mp4", limit)
    except Exception:  # a broken re-encode must not block delivery: fall through to the preview
        log.exception("re-encoding %s under %d bytes failed", src.name, limit)
        fitted = None
    if fitted is not None and fitted.stat().st_size <= limit:
        return _Payload("video", fitted.read_bytes(), f"Re-encoded to fit Telegram's {_mb(limit)} limit.")
    # Too big even re-encoded: a preview frame and a clear note instead of failing.
    note = (
        f"The video ({_mb(size)}) is too large to send here (limit {_mb(limit)}), even re-encoded. "
        "Try fewer frames or 480p."
    )
    try:
        return _Payload("preview", Path(thumbnail(src, tmp / "preview.jpg")).read_bytes(), note)
    except Exception:
        log.exception("no preview frame for %s", src.name)
        return _Payload("note", note=note)


async def deliver_result(bot: Bot, settings: Settings, job: JobView) -> Message | None:
    """Send the video of a succeeded job. Returns None when the chat cannot be reached (bot blocked, chat
    gone): retrying would not help. Network errors propagate, so the scheduler offers the event again."""
    chat_id = int(job.target.chat_id)
    caption = result_caption(job, "telegram")
    with tempfile.TemporaryDirectory(prefix="tg-send-") as tmp:
        payload = await asyncio.to_thread(
            lambda: _prepare(_fetch(settings, job), Path(tmp), settings.telegram.max_upload_bytes)
        )
    if payload.note:
        caption += f"\n<i>{html.escape(payload.note)}</i>"
    common: dict[str, Any] = {
        "reply_parameters": reply_to(job),
        "reply_markup": result_keyboard(job.id),
    }
    try:
        if payload.kind == "missing":
            return await bot.send_message(
                chat_id, f"Job #{job.id} finished, but its video file is missing on the server. Try 🔁 Retry.",
                **common,
            )
        if payload.kind == "note":
            return await bot.send_message(chat_id, caption, parse_mode=ParseMode.HTML, **common)
        if payload.kind == "preview":
            return await bot.send_photo(
                chat_id, photo=payload.data, caption=caption, parse_mode=ParseMode.HTML, **common
            )
        out = job.output
        assert out is not None
        return await bot.send_video(
            chat_id,
            video=payload.data,
            filename=f"turbobot-{job.id}.mp4",
            caption=caption,
            parse_mode=ParseMode.HTML,
            supports_streaming=True,
            width=out.width or None,
            height=out.height or None,
            duration=max(1, round(out.duration_s)) if out.duration_s else None,
            **common,
        )
    except (Forbidden, BadRequest) as exc:
        # The chat is gone, the bot was blocked or removed: nothing to retry.
        log.warning("job %s: result cannot be delivered to chat %s: %s", job.id, chat_id, exc.message)
        return None
