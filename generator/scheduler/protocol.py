"""The wire protocol between the supervisor and its GPU worker processes: named, typed messages with one
encoder and one decoder, used by both sides (``supervisor`` reads what ``worker`` writes, and back).

worker -> supervisor (stdout, one JSON object per line, ``{"type": <name>, ...fields}``):
``Heartbeat`` every heartbeat, ``Ready`` after the engine loaded, ``Fatal`` when it cannot load (then exit
code 4), ``JobChanged`` after each committed change of a job, ``StatsUpdated`` after new step-time
averages were stored. supervisor -> worker (stdin, after the settings line): ``Wake`` and ``CancelJob``.
They are hints only: the database is the truth. Touches nothing but strings. See docs/scheduler.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

JobChange = Literal["started", "progress", "done"]


@dataclass(frozen=True)
class Heartbeat:
    state: str  # starting, warming_up, idle, busy
    job_id: int | None = None
    stalled: bool = False  # the render has not called back for watchdog_seconds
    activity_age: float = 0.0


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any] = field(default_factory=dict)  # engine info for the console


@dataclass(frozen=True)
class Fatal:
    error: str = "the engine could not be loaded"


@dataclass(frozen=True)
class JobChanged:
    job_id: int
    change: JobChange
    fenced: bool = False  # done, but the result was refused (the lease had moved on)


@dataclass(frozen=True)
class StatsUpdated:
    pass


@dataclass(frozen=True)
class Wake:
    """New work was queued: claim now instead of at the next poll."""


@dataclass(frozen=True)
class CancelJob:
    job_id: int


WorkerMessage = Heartbeat | Ready | Fatal | JobChanged | StatsUpdated
Command = Wake | CancelJob

_WORKER_MESSAGES: dict[str, type[Any]] = {
    "heartbeat": Heartbeat, "ready": Ready, "fatal": Fatal, "job_changed": JobChanged, "stats_updated": StatsUpdated,
}
_COMMANDS: dict[str, type[Any]] = {"wake": Wake, "cancel_job": CancelJob}
_NAMES = {cls: name for table in (_WORKER_MESSAGES, _COMMANDS) for name, cls in table.items()}


class ProtocolError(ValueError):
    """A line that is not a message of this protocol."""


def encode(msg: WorkerMessage | Command) -> str:
    """One line (with its newline)."""
    return json.dumps({"type": _NAMES[type(msg)], **asdict(msg)}, separators=(",", ":")) + "\n"


def _decode(line: str | bytes, table: dict[str, type[Any]]) -> Any:
    try:
        data = json.loads(line)
        cls = table[data.pop("type")]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"not a protocol line: {line[:200]!r}") from exc


def decode_message(line: str | bytes) -> WorkerMessage:
    msg: WorkerMessage = _decode(line, _WORKER_MESSAGES)
    return msg


def decode_command(line: str | bytes) -> Command:
    cmd: Command = _decode(line, _COMMANDS)
    return cmd
