"""Extend: an I2V continuation from a video's last frame, delivered as one mp4 (parent + new frames, the shared
frame once), chainable; refusals change nothing. Real worker processes with the embedded tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scheduler_support import make_db, make_settings, t2v, where, who

from generator.engine.extend import join_videos, last_frame_png
from generator.media import decode_frames, probe, write_mp4
from generator.scheduler.api import Refusal
from generator.scheduler.service import Scheduler
from storage.models import Job


def _clip(path: Path, n: int, value: int, size: tuple[int, int] = (64, 48)) -> Path:
    frames = np.full((n, size[1], size[0], 3), value, dtype=np.uint8)
    frames[:, :, : size[0] // 2, 0] = np.arange(n, dtype=np.uint8)[:, None, None] * 20  # frames differ
    return write_mp4(frames, path)


def test_join_keeps_the_shared_frame_once_and_scales_to_the_first(tmp_path: Path) -> None:
    a = _clip(tmp_path / "a.mp4", 5, 40)
    b = _clip(tmp_path / "b.mp4", 5, 200, size=(32, 32))
    frames, w, h = join_videos(a, b, tmp_path / "ab.mp4")
    assert (frames, w, h) == (9, 64, 48)
    info = probe(tmp_path / "ab.mp4")
    assert (info.codec, info.pix_fmt, info.frames, info.faststart) == ("h264", "yuv420p", 9, True)
    got = decode_frames(tmp_path / "ab.mp4").astype(float)
    assert abs(got[:5].mean() - decode_frames(a).astype(float).mean()) < 3
    assert got[5:].mean() > 120  # the continuation, without its first frame
    png, pw, ph = last_frame_png(a)
    assert png.startswith(b"\x89PNG") and (pw, ph) == (64, 48)


async def _started(tmp_path: Path, workers: bool, **sections: dict[str, Any]) -> Scheduler:
    settings = make_settings(tmp_path, quotas={"max_queued_per_user": 10}, **sections)
    sched = Scheduler(settings, db=await make_db(settings))
    await sched.start(run_workers=workers)
    return sched


async def test_extend_end_to_end_on_the_tiny_models_and_chained(tmp_path: Path) -> None:
    sched = await _started(tmp_path, True, engine={"device": "cpu", "compile": False})
    try:
        first = await sched.jobs.submit(t2v("a red fox runs", steps=1, frames=5, seed=77), who(1), where(), "p")
        parent = await sched.views.wait(first.job.id)
        assert parent.state == "succeeded" and parent.output is not None
        ext = await sched.jobs.extend(parent.id, who(1), where(), "e1")
        r = ext.job.request
        assert (r.mode, r.seed, r.prompt, r.extends, ext.job.lineage) == ("i2v", 77, "a red fox runs", parent.id, "extend")
        assert r.image and ext.job.parent_id == parent.id
        done = await sched.views.wait(ext.job.id)
        assert done.state == "succeeded" and done.output is not None, done.error_message
        info = probe(done.output.path)
        assert (info.frames, info.width, info.height) == (9, parent.output.width, parent.output.height)
        assert (info.codec, info.pix_fmt, info.faststart) == ("h264", "yuv420p", True)
        assert done.output.frames == 9
        head = decode_frames(done.output.path)[:5].astype(float)
        assert np.abs(head - decode_frames(parent.output.path).astype(float)).mean() < 6  # the parent, re-encoded
        # Chained, with an edited prompt: the whole chain followed by the new frames.
        ext2 = await sched.jobs.extend(done.id, who(1), where(), "e2", prompt="  the fox  jumps ")
        assert ext2.job.request.prompt == "the fox jumps" and ext2.job.request.seed == 77
        done2 = await sched.views.wait(ext2.job.id)
        assert done2.state == "succeeded" and done2.output is not None and probe(done2.output.path).frames == 13
        # Retry of an extension still continues its parent.
        retry = await sched.jobs.remix(done.id, who(1), where(), "e3", new_seed=True)
        done3 = await sched.views.wait(retry.job.id)
        assert done3.state == "succeeded" and done3.output is not None and done3.output.frames == 9
    finally:
        await sched.stop()
        await sched.db.dispose()


async def _count_jobs(sched: Scheduler) -> int:
    from sqlalchemy import func, select

    async with sched.db.read() as s:
        return int((await s.execute(select(func.count()).select_from(Job))).scalar_one())


async def test_extend_refusals_change_nothing(tmp_path: Path) -> None:
    sched = await _started(tmp_path, False)
    try:
        queued = await sched.jobs.submit(t2v("a cat"), who(1), where(), "q")
        before = await _count_jobs(sched)
        with pytest.raises(Refusal) as err:
            await sched.jobs.extend(queued.job.id, who(1), where(), "x1")
        assert err.value.code == "invalid" and "not finished" in err.value.message
        await sched.admin.cancel(queued.job.id, who(1))
        with pytest.raises(Refusal) as err:
            await sched.jobs.extend(queued.job.id, who(1), where(), "x2")
        assert "was cancelled" in err.value.message
        with pytest.raises(Refusal) as err:
            await sched.jobs.extend(queued.job.id, who(2), where(), "x3")  # someone else's, posted elsewhere
        assert err.value.code == "forbidden" and "cannot be extended here" in err.value.message
        with pytest.raises(Refusal) as err:
            await sched.jobs.extend(999, who(1), where(), "x4")
        assert err.value.code == "not_found"
        assert await _count_jobs(sched) == before
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_extend_needs_an_i2v_model(tmp_path: Path) -> None:
    sched = await _started(tmp_path, False, models={"only-t2v": {"kind": "tiny-t2v"}})
    try:
        job = await sched.jobs.submit(t2v("a cat", model=None), who(1), where(), "q")
        with pytest.raises(Refusal) as err:
            await sched.jobs.extend(job.job.id, who(1), where(), "x")
        assert err.value.code == "model_not_configured" and "image-to-video model" in err.value.message
    finally:
        await sched.stop()
        await sched.db.dispose()
