"""What the scheduler's parts share: settings, the database, the event hub, the one view cache, metrics and,
once started, the supervisor of the local GPU workers; plus the role checks every part needs.

Holds no behaviour of its own beyond small helpers; the parts (``submission``, ``admin``, ``reads``,
``supervision``) each take one ``SchedulerCore``. May touch: the outputs and inputs folders (storage checks).
See docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generator.scheduler.admission import role_of
from generator.scheduler.api import Refusal, RefusalCode, Requester
from generator.scheduler.cache import ViewCache
from generator.scheduler.disk import STORAGE_MESSAGE, storage_problem
from generator.scheduler.events import EventHub
from generator.scheduler.filestore import FileStore
from generator.scheduler.metrics import SchedulerMetrics
from generator.scheduler.moderation import WordList
from generator.scheduler.supervisor import Supervisor
from storage.db import Database
from turbobot.config import SchedulerSettings, Settings

log = logging.getLogger("turbobot.scheduler")


@dataclass
class SchedulerCore:
    settings: Settings
    db: Database
    hub: EventHub
    metrics: SchedulerMetrics
    outputs_dir: Path
    inputs_dir: Path
    cache: ViewCache
    store: FileStore
    blocklist: WordList = field(default_factory=WordList)  # refused prompts ([moderation] blocklist_file)
    nsfw_words: WordList = field(default_factory=WordList)  # age-restricted prompts (community policy)
    supervisor: Supervisor | None = None
    workers_failed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    started: bool = False
    # Set by stop(): background loops finish the pass they are in and return. Cancelling them instead
    # can land inside a transaction's rollback and leave the pool resetting a connection mid-cancel.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def cfg(self) -> SchedulerSettings:
        return self.settings.scheduler

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def wake_workers(self) -> None:
        if self.supervisor is not None:
            self.supervisor.wake()

    def cancel_on_workers(self, job_id: int) -> None:
        if self.supervisor is not None:
            self.supervisor.cancel(job_id)

    async def storage_problem(self) -> str:
        """"" when the outputs and inputs folders take new files with enough free space (or the object
        store answers), else why not."""
        if self.store.kind == "local":
            folders = (self.outputs_dir, self.inputs_dir)
            return await asyncio.to_thread(storage_problem, folders, self.settings.app.min_free_bytes)
        return await asyncio.to_thread(self.store.problem)

    async def require_storage(self) -> None:
        problem = await self.storage_problem()
        if problem:
            # The path and the reason are for the operator's log and /readyz, not for chat users.
            log.warning("refusing new work: %s", problem)
            raise Refusal(RefusalCode.STORAGE_UNAVAILABLE, STORAGE_MESSAGE)

    def is_owner(self, requester: Requester) -> bool:
        return role_of(self.settings, requester.key) == "owner"

    def is_moderator(self, requester: Requester) -> bool:
        return self.is_owner(requester) or requester.key in self.settings.admin.moderators
