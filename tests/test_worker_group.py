"""Worker groups (``scheduler.gpus_per_job`` > 1) end to end on the CPU: the supervisor runs a worker as two real
processes (the worker, rank 0, and a follower, rank 1) joined by gloo, and the real engine renders each job
context-parallel over them (tests/scheduler_groupengine.py: the embedded tiny T2V model with 2 heads).

- The video equals the one a single process renders from the same request and seed. Tolerance: the latents
  agree to ~1e-7 (tests/test_context_parallel.py explains why: float32, only matmul blocking differs); after
  uint8 rounding and H.264 a decoded pixel may differ by a level or two, so we allow 2 of 255 per pixel. The
  mp4 bytes themselves may differ.
- The queue sees one worker: one workers row, one id on the job, one claim (attempts == 1).
- kill -9 of the follower mid-job: the supervisor ends the group, the job is requeued like a dead worker's
  (its attempt counted), the group starts again under the same id and the job finishes on attempt 2.

Every wait has a deadline (``until`` / ``asyncio.timeout``); nothing waits on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from scheduler_support import HERE, make_settings, scheduler_with_workers, t2v, until, where, who

from generator import media
from generator.engine.api import RenderJob
from generator.scheduler.service import Scheduler
from storage import repo_workers

GROUP_ENGINE = f"{HERE / 'scheduler_groupengine.py'}:make_engine"
GROUP = {"worker_devices": ["cpu", "cpu"], "gpus_per_job": 2}
START_LIMIT = 90.0  # two interpreters importing torch and diffusers on a busy 2-core machine


@contextlib.asynccontextmanager
async def group_running(tmp_path: Path, env: dict[str, str] | None = None) -> AsyncIterator[Scheduler]:
    async with scheduler_with_workers(make_settings(tmp_path, scheduler=GROUP), GROUP_ENGINE, env) as sched:
        yield sched


async def finished(sched: Scheduler, job_id: int, limit: float = START_LIMIT + 60) -> Any:
    async with asyncio.timeout(limit):
        return await sched.views.wait(job_id)


async def worker_rows(sched: Scheduler) -> list[Any]:
    async with sched.db.read() as s:
        return await repo_workers.list_workers(s)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def single_process_render(tmp_path: Path, request: Any) -> Path:
    """The same request rendered by the same engine alone (gpus_per_job = 1), in this process."""
    import torch
    from scheduler_groupengine import make_engine

    threads = torch.get_num_threads()
    try:
        eng = make_engine(make_settings(tmp_path / "single"))
        out = tmp_path / "single.mp4"
        eng.render(RenderJob(job_id=1, request=request, output_path=out), progress=lambda _p: None,
                   cancelled=lambda: False)
    finally:
        torch.set_num_threads(threads)
    return out


async def test_group_job_equals_one_process_and_is_one_worker(tmp_path: Path) -> None:
    async with group_running(tmp_path) as sched:
        assert sched.supervisor is not None
        (handle,) = sched.supervisor.handles
        assert handle.devices == ("cpu", "cpu")
        submitted = await sched.jobs.submit(t2v("a lighthouse at dusk", frames=5, steps=2), who(1), where(), "k1")
        done = await finished(sched, submitted.job.id)
        assert done.state == "succeeded" and done.attempts == 1, (done.state, done.error_message)
        assert done.output is not None and done.output.frames == 5
        assert len(handle.follower_pids) == 1 and handle.pid is not None  # both ranks still serving
        assert handle.info.get("gpus_per_job") == 2  # the engine runs over the group (its Ready info)
        rows = await worker_rows(sched)
        assert [r.id for r in rows] == [handle.worker_id]
        ranks = [handle.pid, *handle.follower_pids]
    for pid in ranks:  # a clean stop ends every rank (stdin closed), not only the worker
        assert pid is not None and not alive(pid), pid
    (tmp_path / "single").mkdir()
    single = single_process_render(tmp_path, done.request)
    group = media.decode_frames(done.output.path).astype(np.int16)
    alone = media.decode_frames(single).astype(np.int16)
    assert group.shape == alone.shape == (5, *group.shape[1:])
    assert np.abs(group - alone).max() <= 2, np.abs(group - alone).max()


async def test_killed_follower_restarts_the_group_and_requeues_the_job(tmp_path: Path) -> None:
    mark = tmp_path / "follow-mark"
    async with group_running(tmp_path, env={"TURBOBOT_TEST_FOLLOW_MARK": str(mark)}) as sched:
        assert sched.supervisor is not None
        (handle,) = sched.supervisor.handles
        submitted = await sched.jobs.submit(t2v("hold the lighthouse", frames=5, steps=2), who(1), where(), "k1")
        await until(mark.exists, limit=START_LIMIT, what="the follower took the job")
        follower = int(mark.read_text())
        leader = handle.pid
        assert handle.follower_pids == [follower] and leader is not None
        view = await sched.views.get(submitted.job.id)
        assert view is not None and view.state == "running" and view.attempts == 1
        os.kill(follower, signal.SIGKILL)
        done = await finished(sched, submitted.job.id)
        assert done.state == "succeeded" and done.attempts == 2, (done.state, done.attempts, done.error_message)
        assert handle.restarts == 1 and handle.pid not in (None, leader)  # the whole group was restarted
        assert handle.follower_pids and follower not in handle.follower_pids
        assert not alive(leader)  # the old leader ended with its group
        rows = await worker_rows(sched)
        assert [r.id for r in rows] == [handle.worker_id]
