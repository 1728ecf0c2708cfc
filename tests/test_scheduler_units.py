"""Small pure pieces of the scheduler: device environment, orphan rule, step-time estimates, settings pipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scheduler_support import make_settings

from generator.media import Mp4Writer
from generator.scheduler.estimate import Shape, StepStats
from generator.scheduler.files import JobFile, list_job_files, orphans
from generator.scheduler.group import GroupSpec, backend_for, job_from_json, job_to_json
from generator.scheduler.supervisor import device_env, group_env, new_run_id, worker_ids
from generator.scheduler.worker import (
    decode_settings,
    encode_settings,
    is_fatal_cuda,
    is_oom,
    row_heartbeat_seconds,
)


def test_one_worker_per_device_with_its_own_cuda_visible_devices(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, scheduler={"worker_devices": ["0", "1", "cpu", "auto"]})
    assert worker_ids(settings, "77.ab12", "box") == ["box:77.ab12:0", "box:77.ab12:1", "box:77.ab12:2", "box:77.ab12:3"]
    assert new_run_id() != new_run_id()  # unique per start, even within one process
    assert [device_env(d) for d in settings.scheduler.worker_devices] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": ""}, {},
    ]


def test_a_worker_group_is_one_worker_id_and_every_rank_sees_the_group(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, scheduler={"worker_devices": ["2", "3", "cpu", "cpu"], "gpus_per_job": 2})
    assert worker_ids(settings, "77.ab12", "box") == ["box:77.ab12:0", "box:77.ab12:1"]
    assert [group_env(g) for g in settings.scheduler.worker_groups] == [
        {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": ""},
    ]
    assert [backend_for(g) for g in settings.scheduler.worker_groups] == ["nccl", "gloo"]
    spec = GroupSpec(1, 2, 29500, "gloo")
    assert GroupSpec.parse(spec.arg()) == spec
    for bad in ("2,2,29500,gloo", "0,2,0,gloo", "0,2,29500,mpi", "0,2"):
        with pytest.raises(ValueError):
            GroupSpec.parse(bad)


def test_a_render_job_travels_to_the_followers_unchanged(tmp_path: Path) -> None:
    from generator.engine.api import RenderJob
    from generator.request import GenerationRequest

    req = GenerationRequest(mode="i2v", prompt="a cat", seed=9, frames=9, steps=3, loras="ink:0.5")
    for job in (RenderJob(7, req, tmp_path / "in.png", tmp_path / "out.mp4", "tiny", 4.0),
                RenderJob(8, req.replace(mode="t2v"), None, tmp_path / "o.mp4")):
        assert job_from_json(job_to_json(job)) == job


def test_the_leader_announces_jobs_in_order_and_the_last_reader_clears_them(tmp_path: Path) -> None:
    import dataclasses

    from torch.distributed import HashStore

    from generator.engine.api import RenderJob
    from generator.request import GenerationRequest
    from generator.scheduler.group import GroupLink

    store = HashStore()
    leader, *followers = (GroupLink(GroupSpec(r, 3, 29500, "gloo"), store) for r in range(3))
    jobs = [RenderJob(n, GenerationRequest(mode="t2v", prompt=f"p{n}", seed=n), None, tmp_path / f"{n}.mp4",
                      preview_interval_s=4.0) for n in (1, 2)]
    for job in jobs:
        leader.announce(job)
    for f in followers:  # previews are the leader's alone: the followers are told not to make them
        assert [f.next_job(), f.next_job()] == [dataclasses.replace(j, preview_interval_s=None) for j in jobs]
    assert not store.check(["job/1"]) and not store.check(["job/2"]) and not store.check(["read/2"])


def test_settings_survive_the_pipe_to_the_worker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin={"owners": ["discord:1"]}, scheduler={"worker_devices": ["0", "1"]})
    again = decode_settings(encode_settings(settings))
    assert again == settings and again.database_url == settings.database_url


def test_orphan_rule() -> None:
    d = Path("/out")
    files = [
        JobFile(d / "job-1-1.mp4", 1, 1, False),  # accepted output
        JobFile(d / "job-2-1.mp4", 2, 1, False),  # published by a lost attempt
        JobFile(d / ".partial-job3-2-ab.mp4", 3, 2, True),  # in flight
        JobFile(d / ".partial-job3-1-cd.mp4", 3, 1, True),  # an earlier attempt that died
        JobFile(d / "job-4-1.mp4", 4, 1, False),  # between rename and commit
        JobFile(d / "job-9-1.mp4", 9, 1, False),  # job deleted
    ]
    states = {1: ("succeeded", 1), 2: ("succeeded", 2), 3: ("running", 2), 4: ("running", 1)}
    doomed = orphans(files, states, {str(d / "job-1-1.mp4"), str(d / "job-2-2.mp4")})
    assert sorted(p.name for p in doomed) == [".partial-job3-1-cd.mp4", "job-2-1.mp4", "job-9-1.mp4"]


def test_an_encode_cut_off_by_a_kill_leaves_a_file_the_sweep_knows(tmp_path: Path) -> None:
    """ffmpeg writes beside the worker's partial file; a worker killed mid-encode leaves that temp file,
    which must be recognised as the job's partial output so the orphan sweep removes it."""
    writer = Mp4Writer(tmp_path / ".partial-job7-2-0abc.mp4")
    writer.write(np.zeros((2, 16, 16, 3), np.uint8))  # ffmpeg is running on its temp file now
    try:
        (found,) = list_job_files(tmp_path)
        assert found.path.name.startswith(".partial-job7-2-0abc.enc-") and (found.job_id, found.attempt) == (7, 2)
        assert found.partial
        assert orphans([found], {7: ("running", 2)}, set()) == []  # in flight: kept
        assert orphans([found], {7: ("running", 3)}, set()) == [found.path]  # that attempt died: swept
    finally:
        writer.abort()
    assert list(tmp_path.iterdir()) == []



def test_step_stats_estimate_known_and_unseen_shapes() -> None:
    stats = StepStats()
    small = Shape("m", 832, 480, 81, 4)
    assert stats.remaining(small, 0) is None  # nothing measured yet: no ETA rather than a guess
    stats.record(small, pre_s=2.0, step_s=[3.0, 3.0, 3.0, 3.0], post_s=5.0)
    assert stats.remaining(small, 0) == 2.0 + 4 * 3.0 + 5.0
    assert stats.remaining(small, 3) == 3.0 + 5.0
    big = Shape("m", 1280, 720, 81, 4)  # never seen: scaled by megapixel-frames
    assert abs(stats.remaining(big, 1) - (3 * 3.0 + 5.0) * big.mpf / small.mpf) < 1e-6
    merged = StepStats.merge([stats, StepStats.from_dict(stats.to_dict())])
    assert merged.remaining(small, 0) == stats.remaining(small, 0)


def test_error_classification() -> None:
    import torch

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_fatal_cuda(ValueError("x"))
    assert is_fatal_cuda(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(RuntimeError("CUDA error: device-side assert triggered"))


def test_row_heartbeat_is_written_within_the_freshness_window(tmp_path: Path) -> None:
    for hb, wd in ((5.0, 120.0), (0.1, 20.0), (0.1, 1.0), (30.0, 10.0)):
        settings = make_settings(tmp_path, scheduler={"heartbeat_seconds": hb, "watchdog_seconds": wd})
        assert row_heartbeat_seconds(settings) <= max(wd, 3 * hb) / 3 + 1e-9
