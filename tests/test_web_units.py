"""Console building blocks: metric accumulators that never count a job twice, form coercion, and
``run_web`` serving until told to stop."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path

import aiohttp
import pytest
from web_support import console_settings, make_db

from bots.web import run_web
from bots.web.forms import coerce_options
from bots.web.metrics import LOOKBACK, JobStats, RefusalStats
from generator.request import RequestError
from generator.scheduler.reads import FinishedRow
from generator.scheduler.service import Scheduler

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def row(job_id: int, finished_s: float, *, state: str = "succeeded", code: str = "", wait: float = 2.0,
        run: float = 3.0) -> FinishedRow:
    created = T0 + dt.timedelta(seconds=finished_s - run - wait)
    return FinishedRow(
        id=job_id, state=state, mode="t2v", platform="web", error_code=code, created_at=created,
        started_at=created + dt.timedelta(seconds=wait), finished_at=T0 + dt.timedelta(seconds=finished_s),
        gpu_seconds=run,
    )


def test_job_stats_fold_each_job_once_even_when_commits_arrive_late() -> None:
    stats = JobStats()
    first = [row(1, 10), row(2, 20, state="failed", code="out_of_memory")]
    stats.fold(first)
    assert stats.since == T0 + dt.timedelta(seconds=20) - LOOKBACK
    stats.fold(first)  # the next scrape reads the same rows again (look-back window)
    assert stats.finished[("succeeded", "t2v", "web")] == 1 and stats.finished[("failed", "t2v", "web")] == 1
    assert stats.ooms == 1 and stats.errors["out_of_memory"] == 1
    assert stats.gpu_seconds == 6.0

    # Job 3 finished before job 2 but its transaction committed after the previous scrape.
    stats.fold([row(3, 15, wait=0.4, run=40), row(2, 20, state="failed", code="out_of_memory"), row(4, 30)])
    assert stats.finished[("succeeded", "t2v", "web")] == 3
    assert stats.wait.n == 4 and stats.run.n == 3 and stats.end_to_end.n == 3
    # Buckets are cumulative: 0.4 s wait is in every bucket, 2 s waits from le=2 on.
    assert stats.wait.counts[0] == 1 and stats.wait.counts[WAIT_INDEX_2S] == 4
    assert stats.run.counts[-1] == 3 and stats.run.counts[RUN_INDEX_30S] == 2  # the 40 s run is above 30

    # Ids far behind the watermark are forgotten (memory stays bounded).
    stats.fold([row(5, 10_000)])
    assert set(stats.recent_ids) == {5}


WAIT_INDEX_2S = 2  # WAIT_BUCKETS = (0.5, 1, 2, ...)
RUN_INDEX_30S = 6  # RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, ...)


def test_refusal_stats_count_codes_only() -> None:
    stats = RefusalStats()
    rows = [(1, "quota_daily: telegram:55 a fox"), (2, "blocked_words: discord:9 bad"), (3, "weird detail")]
    stats.fold(rows)
    stats.fold(rows)
    assert dict(stats.by_code) == {"quota_daily": 1, "blocked_words": 1, "other": 1}
    assert all(":" not in code for code in stats.by_code)  # user keys never become labels


def test_coerce_options() -> None:
    out = coerce_options(
        {"steps": "2", "frames": 9, "seed": " 42 ", "sla_topk": "0.12", "adaptive_resolution": "on",
         "aspect": " 9:16 ", "sigma_max": "", "model": None}
    )
    assert out == {"steps": 2, "frames": 9, "seed": 42, "sla_topk": 0.12, "adaptive_resolution": True, "aspect": "9:16"}
    assert coerce_options({"adaptive_resolution": "off"}) == {"adaptive_resolution": False}
    for bad, needle in (
        ({"steps": "2.5"}, "whole number"), ({"steps": True}, "whole number"), ({"boundary": "inf"}, "a number"),
        ({"adaptive_resolution": "maybe"}, "on or off"), ({"prompt": "x"}, "Unknown option"),
        ({"image": "abc"}, "Unknown option"),
    ):
        with pytest.raises(RequestError) as err:
            coerce_options(bad)
        assert needle in err.value.message, bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_web_serves_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    settings = console_settings(tmp_path, web={"port": port})
    db = await make_db(settings)
    scheduler = Scheduler(settings, db=db)
    await scheduler.start(run_workers=False)
    stop = asyncio.Event()
    task = asyncio.create_task(run_web(settings, scheduler, stop))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("the console never answered")
            async with http.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 200 and "Make a video" in await resp.text()
        stop.set()
        await asyncio.wait_for(task, 10)
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
    finally:
        stop.set()
        await scheduler.stop()
        await db.dispose()


def test_engine_status_reads_as_sentences_not_json() -> None:
    from bots.web.api_admin import engine_status

    info = {
        "engine": "turbo", "device": "cuda:0", "attention": "auto", "offload": "model",
        "models": {
            "wan-1.3b": {"kind": "wan2.1-t2v-1.3b", "label": "Wan2.1 1.3B", "demo": False, "loaded": True,
                         "offload_text": True, "offload_dit": False},
            "tiny-i2v": {"kind": "tiny-i2v", "label": "tiny-i2v", "demo": True, "loaded": False},
        },
        "default_t2v": "wan-1.3b", "default_i2v": "tiny-i2v", "demo": False,
        "gpu": "NVIDIA H200", "gpu_memory_gb": 139.8, "gpu_allocated_gb": 2.5,
        "host": "gpu-1", "pid": 4242, "ema": {"step": {"480p": 0.5}}, "step_times": [0.5, 0.6],
        "compiled": True,
    }
    assert engine_status(info) == [
        "Engine turbo on cuda:0 · NVIDIA H200, 139.8 GB (2.5 GB in use)",
        "Attention auto · offload model",
        "Model Wan2.1 1.3B: wan2.1-t2v-1.3b, loaded, default for text-to-video",
        "Model tiny-i2v: untrained demo model, not loaded yet, default for image-to-video",
        "compiled: yes",
        "Process 4242 on gpu-1",
    ]
    assert engine_status({"error": "No weights at /m.pth", "host": "h", "pid": 7}) == [
        "Could not load the engine: No weights at /m.pth", "Process 7 on h",
    ]
    assert engine_status(None) == []
