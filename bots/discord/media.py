"""Fitting a result into Discord's upload limit: the mp4 as is, re-encoded smaller, or a first-frame preview.

Reads jobs through the scheduler's views and files through ``generator.media`` (never the engine)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from generator.media import fit_to_size, thumbnail
from generator.scheduler.api import JobView
from generator.scheduler.filestore import is_remote, local_copy
from turbobot.config import Settings

log = logging.getLogger(__name__)

# Room for the multipart envelope and the JSON payload next to the file.
UPLOAD_HEADROOM = 16 * 1024


@dataclass(frozen=True)
class Upload:
    path: Path | None  # None: nothing can be attached (the note says why)
    filename: str
    note: str  # shown under the caption; "" when the video went through unchanged


def file_size(path: Path) -> int | None:
    """Size in bytes, None when missing (a stat: cheap enough for the event loop)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


async def fit_video(src: Path, dst: Path, budget: int) -> Path | None:
    try:
        fitted = await asyncio.to_thread(fit_to_size, src, dst, budget)
    except Exception:  # a broken re-encode must not block delivery: the preview path follows
        log.exception("could not re-encode %s to %d bytes", src.name, budget)
        return None
    if fitted is None:
        return None
    size = file_size(Path(fitted))
    return Path(fitted) if size is not None and size <= budget else None


async def first_frame(src: Path, dst: Path) -> Path | None:
    try:
        result = await asyncio.to_thread(thumbnail, src, dst)
    except Exception:  # a preview is best effort: the note still explains
        log.exception("could not make a preview of %s", src.name)
        return None
    path = Path(result) if isinstance(result, (str, Path)) else dst
    return path if file_size(path) is not None else None


async def prepare_upload(
    job: JobView, limit: int, workdir: Path, *, force_preview: bool = False, settings: Settings | None = None
) -> Upload:
    """What to attach for a succeeded job under an upload ``limit`` in bytes."""
    assert job.output is not None
    src = Path(job.output.path)
    if settings is not None and is_remote(job.output.path):  # in the object store: a local copy first
        try:
            copy = await asyncio.to_thread(local_copy, settings, job.output.path)
            src = copy if copy is not None else workdir / "missing.mp4"
        except Exception:  # the store is down: DeliverLater would retry, but a clear note is better now
            log.exception("could not download %s", job.output.path)
            src = workdir / "missing.mp4"
    name = f"turbobot-{job.id}.mp4"
    size = file_size(src)
    if size is None:
        return Upload(None, name, "The video file is no longer on the server.")
    budget = max(0, limit - UPLOAD_HEADROOM)
    if not force_preview:
        if size <= budget:
            return Upload(src, name, "")
        fitted = await fit_video(src, workdir / f"job-{job.id}-fit.mp4", budget)
        if fitted is not None:
            return Upload(fitted, name, f"Re-encoded smaller to fit this channel's {mb(limit)} upload limit.")
    note = (f"The video ({mb(size)}) is over this channel's {mb(limit)} upload limit even re-encoded, so here is "
            f"its first frame; the full video is kept as job #{job.id}.")
    preview = await first_frame(src, workdir / f"job-{job.id}-preview.png")
    if preview is not None and (file_size(preview) or 0) <= budget:
        return Upload(preview, f"turbobot-{job.id}-preview.png", note)
    return Upload(None, name, note.replace(", so here is its first frame;", ";"))
