"""Answering an interaction that creates a job: acknowledge in time, refuse privately, post the status.

Discord wants an answer within 3 s. Submitting is a local database transaction and normally takes
milliseconds, so the status message is usually the first answer; when it takes longer (a big image to
download, a busy disk) we defer ("thinking") after ``ACK_BUDGET_S`` and edit that placeholder instead. A
refusal is always private: if the public placeholder is already showing we delete it and answer ephemerally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import discord

from bots.images import ImageRejected
from bots.texts import refusal_text, status_text
from generator.request import RequestError
from generator.scheduler.api import DeliveryTarget, Refusal, Requester, SubmitResult

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

log = logging.getLogger(__name__)

ACK_BUDGET_S = 2.0  # answer or defer well before Discord's 3 s
OOPS = "Something went wrong on my side; please try again in a moment."
TOKEN_LIFETIME_S = 15 * 60
TOKEN_MARGIN_S = 60  # stop using the interaction token a minute early: the upload itself takes time


def requester_of(interaction: discord.Interaction[Any]) -> Requester:
    user = interaction.user
    return Requester(platform="discord", user_id=str(user.id), display_name=user.display_name)


def idempotency_key(interaction: discord.Interaction[Any]) -> str:
    return f"discord:{interaction.id}"


def _is_nsfw(interaction: discord.Interaction[Any]) -> bool:
    """The channel is flagged age-restricted (threads: their parent channel)."""
    channel = interaction.channel
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def target_of(interaction: discord.Interaction[Any], default_limit: int) -> DeliveryTarget:
    """Where the job's status and result go; enough to deliver after a restart (token until it expires)."""
    created = interaction.created_at.timestamp()
    return DeliveryTarget(
        platform="discord",
        chat_id=str(interaction.channel_id or ""),
        guild_id=str(interaction.guild_id or ""),
        nsfw=_is_nsfw(interaction),
        extra={
            "application_id": str(interaction.application_id),
            "interaction_id": str(interaction.id),
            "interaction_token": interaction.token,
            "token_expires_at": min(created, time.time()) + TOKEN_LIFETIME_S - TOKEN_MARGIN_S,
            "upload_limit": int(interaction.filesize_limit or default_limit),
        },
    )


def to_refusal(exc: Exception) -> Refusal:
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, RequestError):
        return Refusal("invalid", exc.message)
    if isinstance(exc, ImageRejected):
        return Refusal("invalid", exc.message)
    raise exc


async def send_private(interaction: discord.Interaction[Any], text: str, **kwargs: Any) -> None:
    """An ephemeral answer, whether or not the interaction was answered already."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True, **kwargs)
    else:
        await interaction.followup.send(text, ephemeral=True, **kwargs)


async def refuse(interaction: discord.Interaction[Any], refusal: Refusal) -> None:
    text = refusal_text(refusal, "discord")
    if interaction.response.is_done():
        # A public "thinking" placeholder is showing: remove it so the refusal stays private.
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()
    await send_private(interaction, text)


async def guarded(interaction: discord.Interaction[Any], handler: Awaitable[Any]) -> None:
    """Run a button/modal handler: refusals answer privately, anything else is logged and excused."""
    try:
        await handler
    except (Refusal, RequestError, ImageRejected) as exc:
        await refuse(interaction, to_refusal(exc))
    except discord.HTTPException as exc:
        log.warning("interaction %s: Discord refused our answer (%s %s)", interaction.id, exc.status, exc.code)
    except Exception:
        log.exception("interaction %s failed", interaction.id)
        with contextlib.suppress(discord.HTTPException):
            await send_private(interaction, OOPS)


async def respond_with_job(
    bot: TurboBot,
    interaction: discord.Interaction[Any],
    make: Callable[[DeliveryTarget], Awaitable[SubmitResult]],
) -> SubmitResult | None:
    """Run ``make`` (download, validate, submit) and answer with the job's status message and buttons."""
    from bots.discord.buttons import job_buttons

    target = target_of(interaction, bot.settings.discord.default_upload_limit_bytes)
    bot.delivery.open_gate(str(interaction.id))
    try:
        task = asyncio.ensure_future(make(target))
        done, _ = await asyncio.wait({task}, timeout=ACK_BUDGET_S)
        if not done:
            try:
                await interaction.response.defer(thinking=True)
            except discord.HTTPException as exc:  # too late to answer; the job is still delivered in the channel
                log.warning("interaction %s: could not defer (%s %s)", interaction.id, exc.status, exc.code)
        try:
            result = await task
        except (Refusal, RequestError, ImageRejected) as exc:
            await refuse(interaction, to_refusal(exc))
            return None
        except Exception:
            log.exception("interaction %s: submitting failed", interaction.id)
            await refuse(interaction, Refusal("internal", OOPS))
            return None
        job = result.job
        if result.duplicate:
            await send_private(interaction, f"That was already submitted as job #{job.id}.")
            return result
        content = status_text(job, "discord")
        view = job_buttons(job)
        if interaction.response.is_done():
            message = await interaction.edit_original_response(content=content, view=view)
            message_id = message.id
        else:
            callback = await interaction.response.send_message(content, view=view)
            message_id = callback.message_id or (await interaction.original_response()).id
        bot.delivery.remember(job.id, str(message_id), content)
        await bot.scheduler.jobs.set_status_message(job.id, str(message_id))
        return result
    finally:
        bot.delivery.close_gate(str(interaction.id))
