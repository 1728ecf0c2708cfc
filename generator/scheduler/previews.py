"""The worker's side of live previews: frames from the engine -> a small animated GIF in the file store -> the
job row, one job at a time, off the render thread.

Why GIF: it is the one small animated format all three front ends show inline and looping without a click.
Discord plays a GIF attachment inline (an mp4 attachment needs a click on its player); Telegram turns a GIF sent
as an animation into its silent looping clip, and ``editMessageMedia`` with ``InputMediaAnimation`` swaps it
in place; browsers animate it in an ``<img>``. At <= 8 frames of <= 256 px it stays a few tens of KB.

The engine calls back from the render thread; ``offer`` is called on the worker's event loop. Encoding and the
upload run in a thread, one at a time: a preview that arrives while one is being published replaces any other
still waiting (only the newest matters), so a slow store or encoder can never queue work behind the sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from PIL import Image

from generator.scheduler.filestore import FileStore

log = logging.getLogger("turbobot.worker")

PREVIEW_PREFIX = ".preview-job"
FRAME_MS = 250  # a preview's few frames play at 4 per second, looping
KEEP_VERSIONS = 2  # the newest and the one before (a front end may be reading it right now)


def preview_name(job_id: int, attempt: int, version: int) -> str:
    """Server-generated (``files`` knows the pattern, so the sweep removes those of crashed workers)."""
    return f"{PREVIEW_PREFIX}{job_id}-{attempt}-v{version}.gif"


def encode_gif(frames: np.ndarray, frame_ms: int = FRAME_MS) -> bytes:
    """uint8 [F, H, W, 3] -> an animated, looping GIF (adaptive palette per frame)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"expected uint8 [F, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    images = [Image.fromarray(f).quantize(colors=64, method=Image.Quantize.FASTOCTREE) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0,
                   optimize=False, disposal=1)
    return buf.getvalue()


class PreviewPublisher:
    """Publishes the previews of one running attempt. ``record(ref, version)`` points the job row at the
    newest (False: the attempt no longer runs, stop); ``notify()`` tells the scheduler the job changed."""

    def __init__(self, store: FileStore, job_id: int, attempt: int, *,
                 record: Callable[[str, int], Awaitable[bool]], notify: Callable[[], None]) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.record = record
        self.notify = notify
        self.version = 0
        self.refs: list[str] = []  # published, oldest first
        self._waiting: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.seconds = 0.0  # spent encoding and storing (for the job's timings)

    def offer(self, frames: np.ndarray) -> None:
        if self._closed:
            return
        self._waiting = frames
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._publish_all())

    async def _publish_all(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting is not None and not self._closed:
            frames, self._waiting = self._waiting, None
            t0 = loop.time()
            try:
                data = await asyncio.to_thread(encode_gif, frames)
                name = preview_name(self.job_id, self.attempt, self.version + 1)
                ref = await asyncio.to_thread(self.store.put_bytes, "outputs", name, data)
                self.refs.append(ref)
                self.version += 1
                if not await self.record(ref, self.version):
                    self._closed = True  # lease lost or the job ended: nothing more to show
                    return
                self.notify()
                while len(self.refs) > KEEP_VERSIONS:
                    await asyncio.to_thread(self.store.delete, self.refs.pop(0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a preview is a nicety: never the job's failure
                log.warning("job %s: preview not published: %s", self.job_id, exc)
            finally:
                self.seconds += loop.time() - t0

    async def close_publishing(self) -> None:
        """Stop taking previews and let one being published finish."""
        self._closed = True
        self._waiting = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def close(self) -> None:
        """``close_publishing``, then delete every stored preview."""
        await self.close_publishing()
        refs, self.refs = self.refs, []
        for ref in refs:
            try:
                await asyncio.to_thread(self.store.delete, ref)
            except Exception as exc:  # the sweep removes it later
                log.info("job %s: preview %s not deleted now: %s", self.job_id, ref, exc)
