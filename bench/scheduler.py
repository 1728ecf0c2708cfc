"""Scheduler overhead on SQLite (issue 5 targets), on this machine's CPU; no GPU involved.

    python bench/scheduler.py [--jobs 100] [--queued 10000] [--users 1000] [--append]

1. Per-job overhead with one real worker process and a no-op engine (1 step, no sleep), jobs one at a time:
   submit -> claim  = the claim's ``started_at`` minus the wall clock just before ``submit()`` was called;
   completion -> event = the sink's arrival time minus the accepted completion's ``finished_at``.
2. Claim time with ``--queued`` queued jobs from ``--users`` users (the fair-order query plus the lease
   update, one write transaction each), p50/p95 over 200 claims.
3. 100 concurrent ``submit()`` calls from 100 users while the worker is claiming: lock errors and latency.

``--append`` adds the numbers, date and command to bench/RESULTS.md (append only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import OperationalError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fast test engine and its settings helper

from scheduler_support import ENGINE_SPEC, make_db, make_settings, t2v  # noqa: E402
from scheduler_testengine import make_base_mp4  # noqa: E402

from generator.request import validate  # noqa: E402
from generator.scheduler import queue  # noqa: E402
from generator.scheduler.api import DeliveryTarget, JobEvent, Refusal, Requester  # noqa: E402
from generator.scheduler.service import Scheduler  # noqa: E402
from storage.models import Job, QuotaUsage, User, utcnow  # noqa: E402
from storage.repo_quotas import utc_day  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


async def per_job_overhead(tmp: Path, mp4: Path, n_jobs: int) -> dict[str, Any]:
    settings = make_settings(
        tmp, scheduler={"progress_interval_seconds": 0.0, "poll_seconds": 0.5, "heartbeat_seconds": 1.0},
        quotas={"max_queued_per_user": 10_000, "global_queue_cap": 100_000, "daily_jobs_per_user": 0},
    )
    db = await make_db(settings)
    sched = Scheduler(
        settings, db=db, engine_factory=ENGINE_SPEC,
        worker_env={"TURBOBOT_TEST_MP4": str(mp4), "TURBOBOT_TEST_STEP_SECONDS": "0"},
    )
    arrivals: dict[int, float] = {}
    done: dict[int, asyncio.Event] = {}

    async def sink(event: JobEvent) -> None:
        if event.terminal:
            arrivals[event.job.id] = time.time()
            done.setdefault(event.job.id, asyncio.Event()).set()

    sched.subscribe("bench", sink)
    await sched.start(run_workers=True)
    # Warm up: the worker has loaded when the first job is done.
    warm = await sched.jobs.submit(t2v("warm up", steps=1), Requester("bench", "0"), DeliveryTarget("bench"), "warm")
    await done.setdefault(warm.job.id, asyncio.Event()).wait()
    to_claim, to_event = [], []
    for i in range(n_jobs):
        t0 = time.time()
        res = await sched.jobs.submit(t2v(f"job {i}", steps=1), Requester("bench", str(i % 10)), DeliveryTarget("bench"),
                                 f"j{i}")
        await done.setdefault(res.job.id, asyncio.Event()).wait()
        view = await sched.views.get(res.job.id)
        assert view is not None and view.state == "succeeded" and view.started_at and view.finished_at
        to_claim.append((view.started_at.timestamp() - t0) * 1000)
        to_event.append((arrivals[res.job.id] - view.finished_at.timestamp()) * 1000)
    # 3. concurrent submissions while the worker claims.
    lock_errors = 0
    latencies: list[float] = []

    async def one(i: int) -> None:
        nonlocal lock_errors
        t = time.perf_counter()
        try:
            await sched.jobs.submit(t2v(f"burst {i}", steps=1), Requester("bench", f"b{i}"), DeliveryTarget("bench"),
                               f"burst{i}")
        except OperationalError as exc:
            if "locked" in str(exc):
                lock_errors += 1
            raise
        latencies.append((time.perf_counter() - t) * 1000)

    t_burst = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(100)), return_exceptions=True)
    burst_s = time.perf_counter() - t_burst
    other = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, Refusal)]
    await sched.stop()
    await db.dispose()
    return {
        "submit_to_claim_ms": (statistics.median(to_claim), pct(to_claim, 0.95)),
        "completion_to_event_ms": (statistics.median(to_event), pct(to_event, 0.95)),
        "burst": {"ok": len(latencies), "lock_errors": lock_errors, "other_errors": len(other),
                  "p50_ms": statistics.median(latencies) if latencies else float("nan"),
                  "max_ms": max(latencies) if latencies else float("nan"), "total_s": burst_s},
    }


async def claim_time(tmp: Path, n_queued: int, n_users: int, n_claims: int = 200) -> dict[str, Any]:
    settings = make_settings(tmp)
    db = await make_db(settings)
    now = utcnow()
    req = validate(t2v("a queued job", seed=1), settings.request_limits).to_dict()
    async with db.write() as s:
        await s.execute(insert(User), [
            {"platform": "bench", "platform_user_id": str(u), "display_name": "", "role": "user", "blocked": False,
             "blocked_reason": "", "created_at": now}
            for u in range(n_users)
        ])
        await s.execute(insert(QuotaUsage), [
            {"user_id": u + 1, "day": utc_day(now), "jobs": 10, "gpu_seconds": float(u % 97)} for u in range(n_users)
        ])
        rows = []
        for i in range(n_queued):
            rows.append({
                "idempotency_key": f"q{i}", "user_id": (i % n_users) + 1, "platform": "bench", "chat_id": "",
                "guild_id": "", "status_message_id": "", "reply_to_message_id": "", "delivery": {},
                "request": req, "state": "queued", "priority": 0, "attempts": 0, "worker_id": "",
                "cancel_requested": False, "progress_step": 0, "progress_total": 0,
                "created_at": now + dt.timedelta(microseconds=i), "gpu_seconds": 0.0, "timings": {},
                "error_code": "", "error_message": "",
                **{k: req[k] for k in ("mode", "prompt", "model", "resolution", "aspect", "frames", "steps", "seed",
                                       "sla_topk", "sigma_max", "sampler", "adaptive_resolution", "boundary",
                                       "attention")},
            })
        await s.execute(insert(Job), rows)
    times = []
    for _ in range(n_claims):
        t = time.perf_counter()
        async with db.write() as s:
            c = await queue.claim(s, worker_id="bench", now=utcnow(), lease_seconds=60, max_running_per_user=1)
        times.append((time.perf_counter() - t) * 1000)
        assert c is not None
    t = time.perf_counter()
    async with db.read() as s:
        snap = await queue.snapshot(s, now=utcnow())
    snapshot_ms = (time.perf_counter() - t) * 1000
    await db.dispose()
    return {"claim_ms": (statistics.median(times), pct(times, 0.95)), "snapshot_ms": snapshot_ms,
            "queued_left": snap.length}


def append_results(text: str) -> None:
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
        fh.write(text)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="turbobot-bench-"))
    try:
        mp4 = make_base_mp4(tmp / "base.mp4")
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        over = await per_job_overhead(tmp / "a", mp4, args.jobs)
        claim = await claim_time(tmp / "b", args.queued, args.users)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    lines = [
        f"- submit -> claim: p50 {over['submit_to_claim_ms'][0]:.1f} ms, p95 {over['submit_to_claim_ms'][1]:.1f} ms "
        f"({args.jobs} jobs, one at a time, 1 worker process)",
        f"- completion -> terminal event at the sink: p50 {over['completion_to_event_ms'][0]:.1f} ms, "
        f"p95 {over['completion_to_event_ms'][1]:.1f} ms",
        f"- claim with {args.queued} queued jobs from {args.users} users: p50 {claim['claim_ms'][0]:.1f} ms, "
        f"p95 {claim['claim_ms'][1]:.1f} ms (queue snapshot for positions: {claim['snapshot_ms']:.0f} ms)",
        f"- 100 concurrent submissions (100 users, worker claiming meanwhile): {over['burst']['ok']} accepted, "
        f"{over['burst']['lock_errors']} 'database is locked', {over['burst']['other_errors']} other errors; "
        f"latency p50 {over['burst']['p50_ms']:.0f} ms, max {over['burst']['max_ms']:.0f} ms, "
        f"all done in {over['burst']['total_s']:.2f} s",
    ]
    print("\n".join(lines))
    if args.append:
        header = (
            f"\n## Scheduler overhead (SQLite, CPU) — {dt.date.today().isoformat()}\n\n"
            f"Command: `python bench/scheduler.py {' '.join(sys.argv[1:])}` on {platform.node()} "
            f"({os.cpu_count()} CPUs, load average {load[0]:.1f} at the end: shared with other work)\n\n"
        )
        append_results(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
