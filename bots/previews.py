"""Reading a running job's live preview (``JobView.preview``: a file-store reference to a small animated GIF)
for the front ends. Previews are replaced while the job runs and deleted when it ends, so a missing one is
normal: the reader answers None and the front end simply keeps what it shows."""

from __future__ import annotations

import asyncio
import logging

from generator.scheduler.filestore import store_for
from turbobot.config import Settings

log = logging.getLogger(__name__)

PREVIEW_FILENAME = "preview.gif"
MAX_PREVIEW_BYTES = 8 * 1024 * 1024  # far above what <= 8 frames of <= 256 px make; a guard, not a limit


def _read(settings: Settings, ref: str) -> bytes | None:
    store = store_for(settings)
    if not store.owns(ref):
        return None
    data = store.get_bytes(ref)
    return data if 0 < len(data) <= MAX_PREVIEW_BYTES else None


async def read_preview(settings: Settings, ref: str) -> bytes | None:
    """The preview's bytes, or None when it is gone (replaced, or the job ended) or unreadable now."""
    if not ref:
        return None
    try:
        return await asyncio.to_thread(_read, settings, ref)
    except Exception as exc:  # FileNotFoundError, a store that is down: the next preview may work
        log.debug("preview %s not readable now: %s", ref, exc)
        return None
