"""Input images from Telegram messages: find them, refuse by metadata before download, then validate."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from telegram import Bot, Message
from telegram.error import BadRequest, TelegramError

from bots.images import ImageRejected, ValidatedImage, load_image, precheck_image
from turbobot.config import Settings


@dataclass(frozen=True)
class ImageRef:
    file_id: str
    size: int | None
    content_type: str | None
    width: int | None
    height: int | None


def find_image(message: Message | None) -> ImageRef | None:
    """The image attached to ``message``: the largest photo size (recompressed by Telegram) or a document
    (original bytes, any type: its MIME type is checked by ``precheck``). Videos, stickers... are not images."""
    if message is None:
        return None
    if message.photo:
        p = message.photo[-1]
        return ImageRef(p.file_id, p.file_size, "image/jpeg", p.width, p.height)
    if message.document is not None:
        d = message.document
        return ImageRef(d.file_id, d.file_size, d.mime_type, None, None)
    return None


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB"


def precheck(ref: ImageRef, settings: Settings) -> None:
    """Refuse without downloading: Telegram's download cap first, then the shared image rules."""
    cap = settings.telegram.max_download_bytes
    if ref.size is not None and ref.size > cap:
        raise ImageRejected(
            f"That file is too big for me to download ({_mb(ref.size)}); bots can fetch files up to {_mb(cap)}. "
            "Please send a smaller image."
        )
    precheck_image(ref.size, ref.content_type, ref.width, ref.height, settings.limits)


async def download(bot: Bot, ref: ImageRef, settings: Settings) -> ValidatedImage:
    """Fetch and validate the image; every failure becomes ``ImageRejected`` with a clear message."""
    try:
        tg_file = await bot.get_file(ref.file_id)
    except BadRequest as exc:
        if "too big" in exc.message.lower():
            raise ImageRejected(
                f"That file is too big for me to download; bots can fetch files up to "
                f"{_mb(settings.telegram.max_download_bytes)}."
            ) from None
        raise ImageRejected("I could not fetch that file from Telegram; please send it again.") from None
    if tg_file.file_size is not None:
        precheck(ImageRef(ref.file_id, tg_file.file_size, ref.content_type, ref.width, ref.height), settings)
    try:
        data = bytes(await tg_file.download_as_bytearray())
    except TelegramError:
        raise ImageRejected("Downloading that file failed; please try again.") from None
    # Decoding a large image takes a while: keep it off the event loop.
    return await asyncio.to_thread(load_image, data, settings.limits)
