"""Prometheus metrics computed from the scheduler's listings at scrape time (so they count every front end's
jobs, and survive restarts of this process), plus whatever the scheduler exports itself. May touch: nothing
but the scheduler's read verbs.

Histograms and counters must never go down, but jobs are deleted (``/forget``) and finish out of id order.
``JobStats`` therefore folds each terminal job in exactly once: it reads jobs finished since a watermark
minus a look-back window (a job may commit a little after a later-finishing one) and remembers the ids it
has already counted inside that window. No user ids are ever used as labels.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from generator.scheduler.api import SchedulerAPI
from generator.scheduler.metrics import REFUSAL_LABELS, refusal_label
from generator.scheduler.reads import FinishedRow, WorkerRow

LOOKBACK = dt.timedelta(seconds=120)
WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
E2E_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
OOM_CODES = ("out_of_memory",)
AUDIT_ID_LOOKBACK = 1000  # PostgreSQL ids may commit out of order: re-read this many behind the newest


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative = [(f"{b:g}", float(c)) for b, c in zip(self.buckets, self.counts, strict=True)]
        cumulative.append(("+Inf", float(self.n)))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


@dataclass
class JobStats:
    """Monotonic aggregates over terminal jobs, each folded in once."""

    wait: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS))
    run: Histogram = field(default_factory=lambda: Histogram(RUN_BUCKETS))
    end_to_end: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (state, mode, platform)
    errors: Counter[str] = field(default_factory=Counter)  # error_code of failed jobs
    gpu_seconds: float = 0.0
    ooms: int = 0
    watermark: dt.datetime | None = None
    recent_ids: dict[int, dt.datetime] = field(default_factory=dict)

    def fold(self, rows: Sequence[FinishedRow]) -> None:
        for row in rows:
            if row.id in self.recent_ids:
                continue
            self.recent_ids[row.id] = row.finished_at
            self.finished[(row.state, row.mode, row.platform)] += 1
            self.gpu_seconds += max(0.0, row.gpu_seconds or 0.0)
            if row.state == "failed" and row.error_code:
                self.errors[row.error_code] += 1
            if row.error_code in OOM_CODES:
                self.ooms += 1
            if row.started_at is not None:
                self.wait.observe((row.started_at - row.created_at).total_seconds())
                if row.state == "succeeded":
                    self.run.observe((row.finished_at - row.started_at).total_seconds())
            if row.state == "succeeded":
                self.end_to_end.observe((row.finished_at - row.created_at).total_seconds())
            if self.watermark is None or row.finished_at > self.watermark:
                self.watermark = row.finished_at
        if self.watermark is not None:
            horizon = self.watermark - LOOKBACK
            self.recent_ids = {i: t for i, t in self.recent_ids.items() if t >= horizon}

    @property
    def since(self) -> dt.datetime | None:
        return None if self.watermark is None else self.watermark - LOOKBACK


@dataclass
class RefusalStats:
    """Refusals the scheduler wrote to the audit log (every front end), by reason code; monotonic."""

    by_code: Counter[str] = field(default_factory=Counter)
    max_id: int = 0
    seen: set[int] = field(default_factory=set)

    def fold(self, rows: Sequence[tuple[int, str]]) -> None:
        for audit_id, detail in rows:
            if audit_id in self.seen:
                continue
            self.seen.add(audit_id)
            self.by_code[refusal_label(detail.split(":", 1)[0].strip())] += 1
            self.max_id = max(self.max_id, audit_id)
        floor = self.max_id - AUDIT_ID_LOOKBACK
        self.seen = {i for i in self.seen if i > floor}

    @property
    def after_id(self) -> int:
        return max(0, self.max_id - AUDIT_ID_LOOKBACK)


@dataclass
class Snapshot:
    states: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerRow] = field(default_factory=list)
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


class ConsoleMetrics(Collector):
    """Refresh from the DB with ``await refresh()``, then ``render()`` the exposition text."""

    def __init__(self, scheduler: SchedulerAPI, worker_fresh_seconds: float) -> None:
        self._scheduler = scheduler
        self._listings = scheduler.listings
        self._fresh = worker_fresh_seconds
        self.stats = JobStats()
        self.refusals = RefusalStats()
        self.snapshot = Snapshot()
        self.web_refusals: Counter[str] = Counter()  # refusals this console showed, by reason code
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    async def refresh(self) -> None:
        while True:  # catch up in pages after a long downtime
            rows = await self._listings.finished_since(self.stats.since)
            before = len(self.stats.recent_ids), self.stats.watermark
            self.stats.fold(rows)
            if len(rows) < 5000 or (len(self.stats.recent_ids), self.stats.watermark) == before:
                break
        while True:
            audit = await self._listings.refusals_after(self.refusals.after_id)
            before_max = self.refusals.max_id
            self.refusals.fold(audit)
            if len(audit) < 5000 or self.refusals.max_id == before_max:
                break
        self.snapshot = Snapshot(
            states=await self._listings.state_counts(), workers=await self._listings.workers()
        )

    def render(self) -> bytes:
        out = generate_latest(self.registry)
        extra = getattr(self._scheduler, "metrics_registry", None)
        if isinstance(extra, CollectorRegistry):
            out += generate_latest(extra)
        return out

    def collect(self) -> Iterator[Metric]:
        snap, st = self.snapshot, self.stats
        depth = GaugeMetricFamily("turbobot_queue_depth", "Jobs waiting or running now.", labels=["state"])
        for state in ("queued", "running"):
            depth.add_metric([state], snap.states.get(state, 0))
        yield depth
        finished = CounterMetricFamily(
            "turbobot_jobs_finished", "Jobs that reached a terminal state.", labels=["state", "mode", "platform"]
        )
        for (state, mode, platform), n in sorted(st.finished.items()):
            finished.add_metric([state, mode, platform], n)
        yield finished
        failures = CounterMetricFamily("turbobot_job_failures", "Failed jobs by error code.", labels=["code"])
        for code, n in sorted(st.errors.items()):
            failures.add_metric([code], n)
        yield failures
        yield st.wait.family("turbobot_job_queue_wait_seconds", "Time from submission to start of rendering.")
        yield st.run.family("turbobot_job_run_seconds", "Rendering time of succeeded jobs.")
        yield st.end_to_end.family(
            "turbobot_job_end_to_end_seconds", "Time from submission to finished video (succeeded jobs)."
        )
        yield CounterMetricFamily("turbobot_gpu_seconds", "GPU time spent on finished jobs.", value=st.gpu_seconds)
        worker_ooms = sum(int(w.info.get("ooms", 0) or 0) for w in snap.workers if isinstance(w.info, dict))
        yield CounterMetricFamily(
            "turbobot_oom", "CUDA out-of-memory events (failed jobs, or recovered ones a worker reports).",
            value=max(st.ooms, worker_ooms),
        )
        yield CounterMetricFamily(
            "turbobot_worker_restarts", "Worker process restarts.", value=sum(w.restarts for w in snap.workers)
        )
        alive = GaugeMetricFamily("turbobot_workers", "Workers by state (heartbeat fresh).", labels=["state"])
        by_state: Counter[str] = Counter()
        for w in snap.workers:
            fresh = (snap.now - w.heartbeat_at).total_seconds() <= self._fresh
            by_state[w.state if fresh else "stale"] += 1
        for state, n in sorted(by_state.items()):
            alive.add_metric([state], n)
        yield alive
        refusals = CounterMetricFamily(
            "turbobot_refusals", "Requests the scheduler refused (all front ends), by reason.", labels=["reason"]
        )
        # Every known reason is exported, at 0 until it happens, so alerts and dashboards can name it.
        by_code = {label: 0 for label in REFUSAL_LABELS} | dict(self.refusals.by_code)
        for reason, n in sorted(by_code.items()):
            refusals.add_metric([reason], n)
        yield refusals
        web_refusals = CounterMetricFamily(
            "turbobot_web_rejections",
            "Console requests answered with an error (scheduler refusals and upload/form checks), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.web_refusals.items()):
            web_refusals.add_metric([reason], n)
        yield web_refusals
