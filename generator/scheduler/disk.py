"""Can the service store files? The outputs and inputs folders must be folders that take a new file and
keep ``app.min_free_bytes`` free. Checked before a worker claims a job and before a submission or upload is
accepted, so a full or read-only disk keeps jobs queued and refuses new ones clearly instead of rendering
every queued job only to fail it at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

PROBE_PREFIX = ".write-probe-"
# What users are told (the path and the reason are for the operator's log, /readyz and the admin page).
STORAGE_MESSAGE = (
    "The server cannot store videos right now (its disk is full or not writable). "
    "The operator has been told; please try again later."
)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def storage_problem(folders: Iterable[Path], min_free_bytes: int) -> str:
    """"" when every folder is usable, else why not (for the operator: logs, /readyz, admin page)."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return f"{folder} is not a folder"
        except OSError as exc:
            return f"{folder} cannot be created: {exc.strerror or exc}"
        # A real write, not os.access: root passes access checks on a read-only mount or folder.
        probe = folder / f"{PROBE_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return f"{folder} is not writable: {exc.strerror or exc}"
        try:
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            return f"cannot read the free space of {folder}: {exc.strerror or exc}"
        if free < min_free_bytes:
            return (
                f"{folder} has only {_size(free)} free; at least {_size(min_free_bytes)} is required "
                "(app.min_free_bytes)"
            )
    return ""
