"""The file store: the local folders (default, unchanged paths) and an S3-compatible bucket on a real
S3-compatible server (moto's standalone server), used by the scheduler, its workers and the front ends."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from moderation_support import models, moderation
from PIL import Image
from s3_support import MotoServer, moto_server, set_creds, store_section
from scheduler_support import (
    Recorder,
    make_db,
    make_settings,
    scheduler_with_workers,
    session_mp4,
    until,
    where,
    who,
)

from generator.request import GenerationRequest
from generator.scheduler import upkeep
from generator.scheduler.api import Requester
from generator.scheduler.filestore import TEMP_PREFIX, LocalStore, S3Store, local_copy, make_store
from generator.scheduler.service import Scheduler
from storage.models import InputImage, Job
from turbobot.config import settings_from_dict

__all__ = ["models"]  # the tiny classifiers' session fixture, imported so pytest finds it here


def png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def s3_store(server: MotoServer, bucket: str) -> S3Store:
    server.make_bucket(bucket)
    return S3Store(bucket=bucket, prefix="p/", endpoint_url=server.url, region="us-east-1",
                   access_key="testing", secret_key="testing", timeout_s=2.0)


# --- the interface, on both backends ------------------------------------------------------------------


def test_default_store_is_the_local_folders_with_todays_paths(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = make_store(settings)
    assert isinstance(store, LocalStore)
    ref = store.put_bytes("inputs", "abc.png", b"x")
    assert ref == str((tmp_path / "inputs" / "abc.png").resolve())
    assert store.ref("outputs", "v.mp4") == str((tmp_path / "outputs" / "v.mp4").resolve())


def _exercise(store: LocalStore | S3Store, tmp_path: Path) -> None:
    ref = store.put_bytes("inputs", "a.png", b"hello")
    assert store.exists(ref) and store.get_bytes(ref) == b"hello" and store.owns(ref)
    src = tmp_path / "src.mp4"
    src.write_bytes(b"video" * 1000)
    out = store.put_file("outputs", "v.a1.mp4", src)
    assert src.exists()  # put_file copies; the caller removes its scratch file
    fetched = store.fetch(out, tmp_path / "dl" / "v.mp4")
    assert fetched is not None and fetched.read_bytes() == src.read_bytes()
    assert store.list("outputs") == [("v.a1.mp4", out)]  # no temp object left behind
    assert [n for n, _ in store.list("inputs")] == ["a.png"]
    # A failed upload leaves nothing under its final name (nor a temp object).
    with pytest.raises(Exception):  # noqa: B017 - the backends raise their own error types
        store.put_file("outputs", "broken.mp4", tmp_path / "missing.mp4")
    assert [n for n, _ in store.list("outputs")] == ["v.a1.mp4"]
    assert store.delete(out) and not store.exists(out) and not store.delete(out)
    assert store.fetch(out, tmp_path / "dl" / "gone.mp4") is None
    assert store.problem() == ""


def test_local_store_interface(tmp_path: Path) -> None:
    _exercise(LocalStore(tmp_path / "in", tmp_path / "out"), tmp_path)


def test_s3_store_interface(s3: MotoServer, tmp_path: Path) -> None:
    store = s3_store(s3, "iface")
    _exercise(store, tmp_path)
    assert store.ref("outputs", "x.mp4") == "s3://iface/p/outputs/x.mp4"
    assert not store.owns("/data/outputs/x.mp4") and not store.owns("s3://other/p/outputs/x.mp4")


def test_s3_store_reports_an_unreachable_server(tmp_path: Path) -> None:
    from s3_support import free_port

    store = S3Store(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                    access_key="k", secret_key="s", timeout_s=0.5)
    assert "not usable" in store.problem()
    with pytest.raises(OSError):
        store.put_bytes("inputs", "a.png", b"x")


def test_s3_settings_need_a_bucket_and_never_hold_credentials() -> None:
    from turbobot.config import ConfigError

    with pytest.raises(ConfigError, match=r"store\.bucket"):
        settings_from_dict({"store": {"backend": "s3"}})
    with pytest.raises(ConfigError, match=r"store\.backend"):
        settings_from_dict({"store": {"backend": "ftp"}})
    with pytest.raises(ConfigError, match="secret"):
        settings_from_dict({"store": {"secret_key": "abc"}})


# --- the scheduler and its worker process on the bucket -----------------------------------------------


async def _running(
    tmp_path: Path, base_mp4: Path, server: MotoServer, bucket: str, **sections: dict[str, Any]
) -> AsyncIterator[Scheduler]:
    server.make_bucket(bucket)
    settings = make_settings(tmp_path, store=store_section(server, bucket), **sections)
    async with scheduler_with_workers(settings, env={"TURBOBOT_TEST_MP4": str(base_mp4)}) as sched:
        yield sched


async def test_i2v_through_the_bucket_delivery_forget_and_sweep(
    s3: MotoServer, tmp_path: Path, base_mp4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_creds(monkeypatch)  # credentials come from the environment only (the worker inherits them)
    gen = _running(tmp_path, base_mp4, s3, "flow")
    sched = await gen.__anext__()
    try:
        rec = Recorder()
        sched.subscribe("test", rec)
        image = png()
        sha = await sched.jobs.save_input(who(1), image, 64, 48)
        async with sched.db.read() as s:
            row = (await s.execute(InputImage.__table__.select())).first()
        assert row is not None and row.path == f"s3://flow/t/inputs/{sha}.png"
        assert not (tmp_path / "inputs" / f"{sha}.png").exists()  # not on the local disk
        req = GenerationRequest(mode="i2v", prompt="move", image=sha, frames=5, steps=2)
        sub = await sched.jobs.submit(req, who(1), where(), "i1")
        async with asyncio.timeout(60):
            done = await sched.views.wait(sub.job.id)
        assert done.state == "succeeded" and done.output is not None, done.error_message
        assert done.output.path.startswith("s3://flow/t/outputs/") and done.output.path.endswith(".a1.mp4")
        # The worker read the image from the bucket: its digest is in the rendered file.
        local = await asyncio.to_thread(local_copy, sched.settings, done.output.path)
        assert local is not None
        data = local.read_bytes()
        assert hashlib.sha256(data).hexdigest() == done.output.sha256
        assert f"image={hashlib.sha256(image).hexdigest()}".encode() in data
        # No video stays on the worker's disk (only the bucket holds it).
        assert not [p for p in (tmp_path / "outputs").iterdir() if p.suffix in (".mp4", ".png")]
        await until(lambda: len(rec.terminal(done.id)) == 1, what="terminal event")

        # An orphan in the bucket (a published attempt whose commit was lost) is swept; the accepted one stays.
        store = sched.store
        orphan = await asyncio.to_thread(store.put_bytes, "outputs", f"i2v_{done.id}_1_x.a9.mp4", b"x")
        temp_like = await asyncio.to_thread(store.put_bytes, "outputs", f"{TEMP_PREFIX}keep", b"x")
        assert await sched.events.sweep() == 1
        assert not store.exists(orphan) and store.exists(done.output.path) and store.exists(temp_like)

        # /forget deletes the output and the input from the bucket.
        assert await sched.admin.forget(who(1)) == 1
        assert not store.exists(done.output.path)
        assert not store.exists(f"s3://flow/t/inputs/{sha}.png")
        async with sched.db.read() as s:
            assert (await s.execute(Job.__table__.select())).first() is None
    finally:
        await gen.aclose()


# --- upkeep: orphaned inputs, abandoned uploads, the download cache ----------------------------------


async def _check_upkeep(sched: Scheduler, store: LocalStore | S3Store) -> None:
    """A saved input stays; an input with no row and a temp object are removed once older than the grace
    (a save in progress uploads before it writes its row), not before."""
    kept = await sched.jobs.save_input(who(1), png(), 64, 48)
    orphan = await asyncio.to_thread(store.put_bytes, "inputs", f"{'ab' * 32}.png", b"x")
    temp = await asyncio.to_thread(store.put_bytes, "outputs", f"{TEMP_PREFIX}123-dead", b"x")
    report = await sched.events.upkeep()  # everything is younger than the grace
    assert (report.inputs, report.temps) == (0, 0) and store.exists(orphan) and store.exists(temp)
    later = time.time() + upkeep.GRACE_SECONDS + 60
    report = await sched.events.upkeep(now=later)
    assert (report.inputs, report.temps) == (1, 1)
    assert not store.exists(orphan) and not store.exists(temp)
    assert store.exists(store.ref("inputs", f"{kept}.png"))
    # Saving an image whose old file is still there makes it fresh again, so it is never swept under its row.
    again = await sched.jobs.save_input(who(2), png(), 64, 48)
    assert again == kept and (await sched.events.upkeep(now=later)).inputs == 0


async def test_upkeep_on_the_local_folders(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    try:
        store = sched.store
        assert isinstance(store, LocalStore)
        await _check_upkeep(sched, store)
    finally:
        await sched.stop()
        await db.dispose()


async def test_upkeep_on_the_bucket_and_its_cache(s3: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_creds(monkeypatch)
    s3.make_bucket("keep")
    settings = make_settings(tmp_path, store={**store_section(s3, "keep"), "cache_max_mb": 1})
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    try:
        store = sched.store
        assert isinstance(store, S3Store)
        await _check_upkeep(sched, store)
        # The download cache: over its 1 MiB limit, the least recently used copies go first.
        cache = tmp_path / "data" / "store_cache"
        refs = [await asyncio.to_thread(store.put_bytes, "outputs", f"v{i}.a1.mp4", bytes(400_000)) for i in range(4)]
        copies = [await asyncio.to_thread(local_copy, settings, ref) for ref in refs]
        assert all(c is not None and c.parent == cache.resolve() for c in copies)
        now = time.time() + upkeep.CACHE_IN_USE_SECONDS + 60
        for i, c in enumerate(copies):  # v0 used first ... v3 last
            assert c is not None
            os.utime(c, (now - 3600 + i, now - 3600 + i))
        assert await asyncio.to_thread(local_copy, settings, refs[0]) == copies[0]  # a cache hit marks it used now
        assert (await sched.events.upkeep(now=now)).cached == 2  # 1.6 MB -> under 1 MiB: v1 and v2 go
        assert sorted(p.name for p in cache.iterdir()) == ["v0.a1.mp4", "v3.a1.mp4"]
    finally:
        await sched.stop()
        await db.dispose()


def test_prune_cache_keeps_files_in_use(tmp_path: Path) -> None:
    now = time.time()
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes(1000))
        os.utime(f, (now - 10, now - 10))  # all used moments ago: a delivery may be about to open them
    assert upkeep.prune_cache(tmp_path, 0, now=now) == 0
    assert upkeep.prune_cache(tmp_path, 0, now=now + upkeep.CACHE_IN_USE_SECONDS + 1) == 3
    assert upkeep.prune_cache(tmp_path / "missing", 0) == 0


async def test_held_video_in_the_bucket_is_kept_released_and_deleted(
    s3: MotoServer, tmp_path: Path, base_mp4: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A video the moderation model held is stored in the bucket like any output, survives the sweep, and an
    admin's release makes it the job's output (delivered from the bucket) or a delete removes the object."""
    set_creds(monkeypatch)
    gen = _running(tmp_path, base_mp4, s3, "held", moderation=moderation(models["nsfw"]))
    sched = await gen.__anext__()
    try:
        rec = Recorder()
        sched.subscribe("test", rec)
        ids = []
        for n in range(2):
            sub = await sched.jobs.submit(GenerationRequest(mode="t2v", prompt=f"fox {n}", frames=5, steps=2),
                                          who(1), where(), f"h{n}")
            async with asyncio.timeout(60):
                done = await sched.views.wait(sub.job.id)
            assert done.error_code == "blocked_output" and done.output is None
            ids.append(done.id)
        refs = [await sched.listings.held_path(i) for i in ids]
        assert all(r is not None and r.startswith("s3://held/t/outputs/") for r in refs)
        store = sched.store
        assert await sched.events.sweep() == 0 and all(store.exists(r) for r in refs if r)

        view = await sched.admin.release_held(ids[0], Requester("web", "operator"))
        assert view.output is not None and view.output.path == refs[0]
        await until(lambda: [e.kind for e in rec.terminal(ids[0])] == ["failed", "succeeded"], what="release")
        local = await asyncio.to_thread(local_copy, sched.settings, refs[0] or "")
        assert local is not None and hashlib.sha256(local.read_bytes()).hexdigest() == view.output.sha256

        await sched.admin.delete_held(ids[1], Requester("web", "operator"))
        assert not store.exists(refs[1] or "") and store.exists(refs[0] or "")
        assert await sched.events.sweep() == 0
    finally:
        await gen.aclose()
