"""Prometheus metrics only the scheduler process can see (the web console's ``/metrics`` adds them to the
ones it computes from the database, via ``Scheduler.metrics_registry``). No user ids as labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from generator.scheduler.api import RefusalCode

EXIT_REASONS = {0: "stopped", 3: "cuda_error", 4: "load_failed", -9: "killed"}


# The ``reason`` labels of refusal metrics: one per code, and "other" for anything unknown (labels stay bounded).
REFUSAL_LABELS = tuple(code.metric_label for code in RefusalCode)
OTHER_REFUSAL = "other"


def refusal_label(code: str) -> str:
    """The metric label of a refusal code as stored (e.g. the audit log's "code: ..." detail)."""
    try:
        return RefusalCode(code).metric_label
    except ValueError:
        return OTHER_REFUSAL


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.fenced = Counter(
            "turbobot_fenced_results", "Worker results discarded because the job's lease was lost.", registry=r
        )
        self.watchdog_kills = Counter(
            "turbobot_watchdog_kills", "Workers killed by the watchdog (silent, stalled or slow to load).", registry=r
        )
        self.worker_exits = Counter(
            "turbobot_worker_exits", "Worker process exits, by reason.", ["reason"], registry=r
        )
        self.requeued = Counter(
            "turbobot_jobs_requeued", "Running jobs put back in the queue after their worker was lost.", registry=r
        )
        self.events = Counter("turbobot_events", "Events handed to front-end sinks, by kind.", ["kind"], registry=r)
        self.delivery_failures = Counter(
            "turbobot_delivery_failures", "Terminal events a sink raised on (offered again later).", registry=r
        )

    def worker_exit(self, returncode: int | None) -> None:
        reason = EXIT_REASONS.get(returncode if returncode is not None else -1, "crash")
        self.worker_exits.labels(reason).inc()
