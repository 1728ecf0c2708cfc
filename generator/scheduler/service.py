"""``Scheduler``: the service every front end talks to, made of small parts with one job each.

    scheduler = Scheduler(settings)            # or Scheduler(settings, db=existing_database)
    await scheduler.start(run_workers=True)    # False: no local GPU workers (they run elsewhere)
    scheduler.subscribe("discord", sink)       # events for jobs whose target platform is "discord"
    await scheduler.jobs.submit(...)           # admission: submit, remix/retry, save_input, set_status_message
    await scheduler.admin.cancel(...)          # admin actions: cancel, delete, forget, limits, block/unblock
    await scheduler.views.get(...)             # read-only views: get, wait, jobs_for, queue_info, readiness
    await scheduler.listings.jobs(...)         # console/CLI listings across every user
    await scheduler.stop()

``start`` does not create or migrate tables: run ``storage.migrate.upgrade_database(url)`` first.
On start: expired leases are requeued, jobs of workers that are really gone are released, orphaned files
are swept, and undelivered results are offered to sinks as they subscribe (``supervision``).

Nothing here blocks the event loop: the database is reached through the async driver, file work goes to
threads and GPU work happens in worker processes (``generator.scheduler.worker``). May touch: what its parts
touch (the database through ``storage``, the outputs and inputs folders, worker processes). See
docs/scheduler.md.
"""

from __future__ import annotations

from generator.scheduler.admin import AdminActions
from generator.scheduler.api import EventSink
from generator.scheduler.cache import ViewCache
from generator.scheduler.community import Communities
from generator.scheduler.core import SchedulerCore
from generator.scheduler.events import EventHub
from generator.scheduler.filestore import make_store
from generator.scheduler.metrics import SchedulerMetrics
from generator.scheduler.moderation import word_list
from generator.scheduler.reads import JobViews, Listings
from generator.scheduler.submission import Submissions
from generator.scheduler.supervision import WorkerEvents
from generator.scheduler.supervisor import Supervisor
from storage.db import Database, open_database
from turbobot.config import Settings


class Scheduler:
    """The job service: lifecycle here, verbs on ``jobs``, ``admin``, ``views`` and ``listings``."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database | None = None,
        engine_factory: str | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        """``engine_factory`` ("module:function" or "/file.py:function") overrides the workers' engine
        (default: ``generator.engine:create_engine``, or ``$TURBOBOT_ENGINE_FACTORY``)."""
        self.settings = settings
        self._own_db = db is None
        self.db = db or open_database(settings)
        self.metrics = SchedulerMetrics()
        self.metrics_registry = self.metrics.registry  # picked up by the web console's /metrics
        hub = EventHub(
            load=lambda job_id: self.events.load_for_events(job_id),
            mark_delivered=lambda job_id: self.events.mark_delivered(job_id),
            progress_interval=settings.scheduler.progress_interval_seconds,
            on_event=lambda kind, ok: self.events.count_event(kind, ok),
        )
        self._core = SchedulerCore(
            settings=settings, db=self.db, hub=hub, metrics=self.metrics,
            outputs_dir=settings.path(settings.app.outputs_dir).resolve(),
            inputs_dir=settings.path(settings.app.inputs_dir).resolve(),
            cache=ViewCache(self.db, settings.scheduler), store=make_store(settings),
            blocklist=word_list(settings.admin.blocked_words, settings, settings.moderation.blocklist_file),
            nsfw_words=word_list((), settings, settings.moderation.nsfw_words_file),
        )
        self.store = self._core.store
        self.hub = hub
        self.outputs_dir = self._core.outputs_dir
        self.inputs_dir = self._core.inputs_dir
        self.events = WorkerEvents(self._core, engine_factory=engine_factory, worker_env=dict(worker_env or {}))
        self.views = JobViews(self._core)
        self.listings = Listings(self._core)
        self.jobs = Submissions(self._core)
        self.communities = Communities(self._core)
        self.admin = AdminActions(self._core, self.views)

    @property
    def supervisor(self) -> Supervisor | None:
        """The local workers' supervisor while started with ``run_workers=True``."""
        return self._core.supervisor

    async def start(self, run_workers: bool = True) -> None:
        await self.events.start(run_workers)

    async def stop(self) -> None:
        if not self._core.started:
            return
        await self.events.stop()
        if self._own_db:
            await self.db.dispose()

    def subscribe(self, platform: str, sink: EventSink) -> None:
        """Events for jobs whose target platform is ``platform`` (see ``api.SchedulerAPI.subscribe``)."""
        self.events.subscribe(platform, sink)

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
