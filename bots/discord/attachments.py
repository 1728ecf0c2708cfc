"""Input images from Discord: check the attachment's metadata first, download and validate only then."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import discord

from bots.commands import submit_text
from bots.images import ImageRejected, load_image, precheck_image
from generator.scheduler.api import DeliveryTarget, Requester, SubmitResult

if TYPE_CHECKING:
    from bots.discord.bot import TurboBot

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")


def looks_like_image(att: discord.Attachment) -> bool:
    if att.content_type:
        return att.content_type.lower().startswith("image/")
    return att.filename.lower().endswith(_IMAGE_SUFFIXES)


def image_of(message: discord.Message) -> discord.Attachment | None:
    """The first image attachment of a message (context-menu target), else its first attachment."""
    for att in message.attachments:
        if looks_like_image(att):
            return att
    return message.attachments[0] if message.attachments else None


def precheck(att: discord.Attachment, bot: TurboBot) -> None:
    """Refuse by Discord's reported size, type and dimensions before downloading anything."""
    precheck_image(att.size, att.content_type, att.width, att.height, bot.settings.limits)


async def submit_image(
    bot: TurboBot,
    requester: Requester,
    target: DeliveryTarget,
    key: str,
    att: discord.Attachment,
    text: str,
    options: dict[str, Any] | None,
) -> SubmitResult:
    """Download, decode and re-encode the image, store it, and submit the i2v job."""
    precheck(att, bot)
    try:
        data = await att.read()
    except discord.HTTPException:
        raise ImageRejected("I could not download that image from Discord; please send it again.") from None
    image = await asyncio.to_thread(load_image, data, bot.settings.limits)  # Pillow decode off the event loop
    ref = await bot.scheduler.jobs.save_input(requester, image.png_bytes, image.width, image.height)
    return await submit_text(bot.scheduler, bot.settings, requester, target, key, "i2v", text,
                             image=ref, options=options)
