"""Scheduler overhead on SQLite (issue 5 targets), on this machine's CPU; no GPU involved.

    python bench/scheduler.py [--jobs 100] [--queued 10000] [--users 1000] [--append]

1. Per-job overhead with one real worker process and a no-op engine (1 step, no sleep), jobs one at a time:
   submit -> claim  = the claim's ``started_at`` minus the wall clock just before ``submit()`` was called;
   completion -> event = the sink's arrival time minus the accepted completion's ``finished_at``.
2. Claim time with ``--queued`` queued jobs from ``--users`` users (the fair-order query plus the lease
   update, one write transaction each), p50/p95 over 200 claims.
3. 100 concurrent ``submit()`` calls from 100 users while the worker is claiming: lock errors and latency.

``--postgres [URL]`` runs instead the multi-host claim benchmark (issue 18): ``--workers`` (8) worker processes
claim (and at once finish) ``--queued`` jobs of ``--users`` users on PostgreSQL, each claim one write transaction
(the database's clock, the fair pick, FOR UPDATE SKIP LOCKED, the lease); claim p50/p95, throughput, and every job
claimed exactly once. Without URL a throwaway server is started as the tests do (initdb + pg_ctl).

``--append`` adds the numbers, date and command to bench/RESULTS.md (append only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fast test engine and its settings helper

from scheduler_support import ENGINE_SPEC, make_db, make_settings, t2v  # noqa: E402
from scheduler_testengine import make_base_mp4  # noqa: E402

from generator.request import validate  # noqa: E402
from generator.scheduler import queue  # noqa: E402
from generator.scheduler.api import DeliveryTarget, JobEvent, Refusal, Requester  # noqa: E402
from generator.scheduler.service import Scheduler  # noqa: E402
from storage.db import Database, db_now  # noqa: E402
from storage.models import Base, Job, QuotaUsage, User, utcnow  # noqa: E402
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


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A superuser URL of a PostgreSQL server started here, as the tests start theirs; stopped on exit."""
    import subprocess

    from test_storage_postgres import _free_port, _pg_bin_dir, _run_as_prefix

    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL binaries (initdb/pg_ctl); install postgresql or pass --postgres URL")
    prefix, user = _run_as_prefix()
    base = Path(tempfile.mkdtemp(prefix="turbobot-bench-pg-", dir="/tmp"))
    if user is not None:
        import pwd
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, port = base / "data", _free_port()

    def run(*argv: str) -> None:
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "turbobot", "-A", "trust", "-E", "UTF8", "--locale=C")
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            # Stock durability (fsync on): the numbers are those of a real deployment, not of a test server.
            conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                       "max_connections = 100\n")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "start")
        try:
            yield f"postgresql+asyncpg://turbobot@127.0.0.1:{port}/postgres"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def pg_seed(url: str, n_queued: int, n_users: int) -> None:
    db = Database(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    now = utcnow()
    settings = make_settings(Path(tempfile.gettempdir()))
    req = validate(t2v("a queued job", seed=1), settings.request_limits).to_dict()
    columns = set(Job.__table__.columns.keys())  # whatever the jobs table holds today
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
            row = {
                "idempotency_key": f"q{i}", "user_id": (i % n_users) + 1, "platform": "bench", "chat_id": "",
                "guild_id": "", "status_message_id": "", "reply_to_message_id": "", "delivery": {},
                "request": req, "state": "queued", "attempts": 0, "worker_id": "", "cancel_requested": False,
                "progress_step": 0, "progress_total": 0, "created_at": now + dt.timedelta(microseconds=i),
                "gpu_seconds": 0.0, "timings": {}, "error_code": "", "error_message": "", **req,
            }
            rows.append({k: v for k, v in row.items() if k in columns})
        for start in range(0, len(rows), 2000):
            await s.execute(insert(Job), rows[start:start + 2000])
    await db.dispose()


async def _pg_claim_loop(url: str, worker: str, go: Any) -> dict[str, Any]:
    db = Database(url)
    async with db.read() as s:  # connect before the start signal
        await s.execute(select(1))
    go.wait()
    claimed: list[int] = []
    claim_ms: list[float] = []
    empty_ms: list[float] = []
    t_start = time.perf_counter()
    while True:
        t = time.perf_counter()
        async with db.write() as s:
            c = await queue.claim(s, worker_id=worker, now=await db_now(s), lease_seconds=60,
                                  max_running_per_user=1, postgres=True)
        ms = (time.perf_counter() - t) * 1000
        if c is None:
            empty_ms.append(ms)
            async with db.read() as s:
                left = (await s.execute(select(func.count()).where(Job.state == "queued"))).scalar_one()
            if left == 0:
                break
            await asyncio.sleep(0.005)  # the rest are locked or capped by other claimers right now
            continue
        claim_ms.append(ms)
        claimed.append(c.job_id)
        async with db.write() as s:  # the job "runs" in no time: the claimer's next claim follows at once
            assert await queue.finish(s, c.job_id, c.attempt, state="failed", code="bench", message="",
                                      now=await db_now(s))
    elapsed = time.perf_counter() - t_start
    await db.dispose()
    return {"ids": claimed, "claim_ms": claim_ms, "empty_ms": empty_ms, "elapsed": elapsed}


def _pg_claimer(url: str, worker: str, go: Any, out: str) -> None:
    Path(out).write_text(json.dumps(asyncio.run(_pg_claim_loop(url, worker, go))))


async def pg_claims(url: str, n_workers: int, n_queued: int, n_users: int, tmp: Path) -> dict[str, Any]:
    await pg_seed(url, n_queued, n_users)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    outs = [tmp / f"claimer{i}.json" for i in range(n_workers)]
    procs = [ctx.Process(target=_pg_claimer, args=(url, f"bench-host{i % 2}/w{i}", go, str(outs[i])))
             for i in range(n_workers)]
    for p in procs:
        p.start()
    await asyncio.sleep(3.0)  # let every process import and connect (they wait on ``go``)
    t0 = time.perf_counter()
    go.set()
    for p in procs:
        await asyncio.to_thread(p.join)
        assert p.exitcode == 0, f"a claimer exited with {p.exitcode}"
    wall = time.perf_counter() - t0
    results = [json.loads(o.read_text()) for o in outs]
    ids = [i for r in results for i in r["ids"]]
    times = [m for r in results for m in r["claim_ms"]]
    counts = Counter(ids)
    twice = [i for i, n in counts.items() if n > 1]
    db = Database(url)
    async with db.read() as s:
        attempts = Counter((await s.execute(select(Job.attempts))).scalars().all())
        states = Counter((await s.execute(select(Job.state))).scalars().all())
    await db.dispose()
    assert not twice, f"claimed more than once: {twice[:10]}"
    assert len(counts) == n_queued and attempts == Counter({1: n_queued}), (len(counts), attempts, states)
    return {
        "claims": len(ids), "claim_ms": (statistics.median(times), pct(times, 0.95), pct(times, 0.99)),
        "wall_s": wall, "per_s": len(ids) / wall, "empty": sum(len(r["empty_ms"]) for r in results),
        "per_worker": sorted(len(r["ids"]) for r in results),
    }


async def postgres_main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="turbobot-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            url = args.postgres or stack.enter_context(throwaway_postgres())
            r = await pg_claims(url, args.workers, args.queued, args.users, tmp)
            version = await _pg_version(url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    p50 = r["claim_ms"][0]
    lines = [
        f"- {args.workers} claimer processes, {args.queued} queued jobs of {args.users} users, at most 1 running per "
        f"user, each claim followed by the job's (fenced) finish: {r['claims']} claims in {r['wall_s']:.1f} s = "
        f"**{r['per_s']:.0f} claims/s**",
        f"- claim (one write transaction: database clock, fair pick, SKIP LOCKED, lease): **p50 {p50:.1f} ms**, "
        f"p95 {r['claim_ms'][1]:.1f} ms, p99 {r['claim_ms'][2]:.1f} ms; {r['empty']} empty claims (everything "
        f"claimable locked or capped at that instant); claims per process {r['per_worker']}",
        f"- every job claimed exactly once (no double claim; attempts = 1 for all {args.queued} jobs)",
        f"- target claim p50 <= 10 ms: **{'met' if p50 <= 10 else 'not met'}**",
    ]
    print("\n".join(lines))
    if args.append:
        server = "a throwaway local server (fsync on)" if not args.postgres else "the given server"
        header = (
            f"\n## Scheduler claims on PostgreSQL (issue 18 item 6) — {dt.date.today().isoformat()}\n\n"
            f"Command: `python bench/scheduler.py {' '.join(sys.argv[1:])}` on {platform.node()} "
            f"({os.cpu_count()} CPUs shared by the claimers and {server}, {version}; load average {load[0]:.1f} "
            f"at the end, shared with other work)\n\n"
        )
        append_results(header + "\n".join(lines) + "\n")


async def _pg_version(url: str) -> str:
    db = Database(url)
    async with db.read() as s:
        full = str((await s.execute(select(func.version()))).scalar_one())
    await db.dispose()
    return " ".join(full.split()[:2])


def append_results(text: str) -> None:
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
        fh.write(text)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--postgres", nargs="?", const="", default=None, metavar="URL",
                    help="the PostgreSQL claim benchmark instead (no URL: start a throwaway server)")
    ap.add_argument("--workers", type=int, default=8, help="claimer processes for --postgres")
    args = ap.parse_args()
    if args.postgres is not None:
        await postgres_main(args)
        return
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
