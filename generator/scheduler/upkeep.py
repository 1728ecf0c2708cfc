"""Slow housekeeping of stored files, run every few minutes by the scheduler's maintenance loop:

- input images with no database row (a save interrupted between the upload and its row, or a row removed
  while its file could not be), after a grace period that covers a save in progress;
- temp objects of uploads that never finished (an uploader killed between its temp key and the copy);
- the local cache of downloaded objects (``store.cache_dir``), kept under its size limit, oldest use first.

Videos have their own, state-based sweep (``WorkerEvents.sweep``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from generator.scheduler.files import INPUT_PARTIAL_PREFIX
from generator.scheduler.filestore import TEMP_PREFIX, Entry, FileStore
from storage import repo_files
from storage.db import Database

log = logging.getLogger(__name__)

# A save uploads the image, then writes its row; an upload takes seconds at most. Anything younger than this
# may still be on its way to a row (also used for temp objects, whose upload may still be running).
GRACE_SECONDS = 3600.0
# A cached copy handed to a delivery moments ago may be about to be opened: never prune those.
CACHE_IN_USE_SECONDS = 600.0
_INPUT_NAME = re.compile(r"^([0-9a-f]{64})\.png$")


@dataclass
class UpkeepReport:
    inputs: int = 0
    temps: int = 0
    cached: int = 0


def stale(entries: list[Entry], now: float, grace: float = GRACE_SECONDS) -> list[Entry]:
    return [e for e in entries if now - e.modified > grace]


async def sweep_store(db: Database, store: FileStore, *, now: float | None = None) -> UpkeepReport:
    """Delete orphaned input images and abandoned temp objects (store calls run in threads)."""
    clock = time.time() if now is None else now
    report = UpkeepReport()
    inputs = stale(await asyncio.to_thread(store.entries, "inputs"), clock)
    outputs = stale(await asyncio.to_thread(store.entries, "outputs"), clock)
    temps = [e for e in inputs + outputs if e.name.startswith((TEMP_PREFIX, INPUT_PARTIAL_PREFIX))]
    by_sha = {m.group(1): e for e in inputs if (m := _INPUT_NAME.match(e.name))}
    if by_sha:
        async with db.read() as s:
            known = await repo_files.known_input_shas(s, sorted(by_sha))
        orphans = [e for sha, e in by_sha.items() if sha not in known]
    else:
        orphans = []

    def remove(doomed: list[Entry]) -> int:
        return sum(1 for e in doomed if store.delete(e.ref))

    report.temps = await asyncio.to_thread(remove, temps)
    report.inputs = await asyncio.to_thread(remove, orphans)
    if report.temps or report.inputs:
        log.info("upkeep: removed %d orphaned input image(s) and %d abandoned upload(s)", report.inputs, report.temps)
    return report


def prune_cache(cache_dir: Path, max_bytes: int, *, now: float | None = None) -> int:
    """Delete the least recently used cached copies until the folder holds at most ``max_bytes``; files
    used within ``CACHE_IN_USE_SECONDS`` stay even above the limit. Returns how many were removed."""
    clock = time.time() if now is None else now
    files: list[tuple[float, int, Path]] = []
    try:
        with os.scandir(cache_dir) as it:
            for d in it:
                try:
                    st = d.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if d.is_file(follow_symlinks=False):
                    files.append((st.st_mtime, st.st_size, Path(d.path)))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    total = sum(size for _, size, _ in files)
    removed = 0
    for mtime, size, path in sorted(files):
        if total <= max_bytes:
            break
        if clock - mtime < CACHE_IN_USE_SECONDS:
            break  # sorted by use: everything after this is newer still
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        total -= size
        removed += 1
    if removed:
        log.info("upkeep: pruned %d cached download(s) from %s", removed, cache_dir)
    return removed
