"""One bot host plus two GPU worker hosts, on real servers started here: PostgreSQL (the queue) and an
S3-compatible object store (moto's standalone server). The bot side is the scheduler in-process (no local
workers, like ``turbobot run --no-workers``); each worker host is a ``turbobot worker`` process with its
own data folder, sharing no files with the others. Skipped with the reason when a server is missing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from s3_support import CREDS, MotoServer, free_port, moto_server
from scheduler_support import ENGINE_SPEC, Recorder, make_settings, session_mp4, t2v, until, where, who
from sqlalchemy import select
from test_storage_postgres import pg_server_url, pg_url  # noqa: F401  (fixtures)

from generator.request import GenerationRequest
from generator.scheduler.filestore import local_copy
from generator.scheduler.service import Scheduler
from storage import repo_workers
from storage.db import Database
from storage.migrate import upgrade_database
from storage.models import Job

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "multihost"


class Proxy:
    """A TCP relay in front of the object store: ``down()`` refuses and cuts every connection (an outage
    as the worker hosts see it), ``up()`` serves again; the store itself keeps its objects."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def _toml(data: dict[str, dict[str, object]]) -> str:
    def val(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(f"[{name}]\n" + "\n".join(f"{k} = {val(v)}" for k, v in sec.items()) + "\n"
                     for name, sec in data.items())


def _sections(data_dir: Path, db_url: str, endpoint: str) -> dict[str, dict[str, object]]:
    return {
        "app": {"data_dir": str(data_dir), "outputs_dir": str(data_dir / "outputs"),
                "inputs_dir": str(data_dir / "inputs")},
        "database": {"url": db_url},
        "scheduler": {"lease_seconds": 3.0, "heartbeat_seconds": 0.2, "poll_seconds": 0.05,
                      "progress_interval_seconds": 0.0, "max_attempts": 3, "worker_devices": ["cpu"],
                      "watchdog_seconds": 30.0, "worker_start_timeout_seconds": 60.0},
        "quotas": {"max_queued_per_user": 20, "daily_jobs_per_user": 100, "max_running_per_user": 2},
        "store": {"backend": "s3", "endpoint_url": endpoint, "bucket": BUCKET, "prefix": "mh/",
                  "region": "us-east-1", "timeout_seconds": 1.0, "cache_dir": str(data_dir / "cache")},
        "web": {"enabled": False},
    }


class WorkerHost:
    def __init__(self, name: str, base: Path, db_url: str, endpoint: str, mp4: Path) -> None:
        self.dir = base / name
        self.dir.mkdir()
        cfg = self.dir / "config.toml"
        cfg.write_text(_toml(_sections(self.dir / "data", db_url, endpoint)))
        env = {**os.environ, **CREDS, "PYTHONPATH": str(ROOT), "TURBOBOT_ENGINE_FACTORY": ENGINE_SPEC,
               "TURBOBOT_TEST_MP4": str(mp4), "TURBOBOT_TEST_STEP_SECONDS": "0.4"}
        self.log = open(self.dir / "host.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "turbobot.cli", "--config", str(cfg), "worker", "--devices", "cpu"],
            cwd=self.dir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def prefix(self) -> str:
        """Worker ids of this host start with this (``host:pid.token:slot``)."""
        return f"{socket.gethostname()}:{self.proc.pid}."

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the host and its worker children, as a power cut
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 40)).save(buf, format="PNG")
    return buf.getvalue()


async def test_two_worker_hosts_share_the_queue_and_the_store(
    tmp_path: Path, pg_url: str, s3: MotoServer, base_mp4: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    s3.make_bucket(BUCKET)
    proxy = Proxy(s3.port)
    proxy.up()
    await upgrade_database(pg_url)
    bot_dir = tmp_path / "bot"
    settings = make_settings(bot_dir, **_sections(bot_dir, pg_url, s3.url))
    db = Database(pg_url)
    sched = Scheduler(settings, db=db)
    rec = Recorder()
    sched.subscribe("test", rec)
    await sched.start(run_workers=False)  # the bot host: no local workers
    hosts = [WorkerHost(n, tmp_path, pg_url, f"http://127.0.0.1:{proxy.port}", base_mp4) for n in ("gpu-a", "gpu-b")]
    try:
        async def rows() -> list:
            async with db.read() as s:
                return list(await repo_workers.list_workers(s))

        async def ready_hosts() -> bool:
            live = [w for w in await rows() if w.state == "idle"]
            return all(any(w.id.startswith(h.prefix) for w in live) for h in hosts)

        await until(ready_hosts, limit=90, what="both worker hosts ready")

        # Jobs spread over both hosts; an I2V job's image reaches its worker through the store only.
        image = _png()
        sha = await sched.jobs.save_input(who(1), image, 64, 48)
        ids = [(await sched.jobs.submit(
            GenerationRequest(mode="i2v", prompt="move", image=sha, frames=5, steps=2), who(1), where(), "i2v",
        )).job.id]
        for i in range(5):
            ids.append((await sched.jobs.submit(t2v(f"job {i}", steps=3), who(10 + i), where(), f"k{i}")).job.id)
        async with asyncio.timeout(120):
            done = [await sched.views.wait(j) for j in ids]
        assert [d.state for d in done] == ["succeeded"] * len(ids), [d.error_message for d in done]
        async with db.read() as s:
            owners = dict((await s.execute(select(Job.id, Job.worker_id).where(Job.id.in_(ids)))).tuples().all())
        assert all(any(owners[j].startswith(h.prefix) for j in ids) for h in hosts), owners
        local = await asyncio.to_thread(local_copy, settings, done[0].output.path)  # type: ignore[union-attr]
        assert local is not None
        assert f"image={hashlib.sha256(image).hexdigest()}".encode() in local.read_bytes()
        for h in hosts:  # nothing shared: each host's folder holds no video after upload
            assert not list((h.dir / "data").rglob("*.mp4"))

        # kill -9 one host mid-job: the other finishes it; delivered exactly once.
        slow = (await sched.jobs.submit(t2v("slow one", steps=4), who(30), where(), "slow")).job.id
        holder: list[WorkerHost] = []

        async def running_somewhere() -> bool:
            async with db.read() as s:
                job = await s.get(Job, slow, populate_existing=True)
            if job is None or job.state != "running" or job.progress_step < 1:
                return False
            holder.extend(h for h in hosts if job.worker_id.startswith(h.prefix))
            return bool(holder)

        await until(running_somewhere, limit=90, what="slow job running")
        victim = holder[0]
        survivor = next(h for h in hosts if h is not victim)
        victim.kill9()
        async with asyncio.timeout(120):
            final = await sched.views.wait(slow)
        assert final.state == "succeeded"
        async with db.read() as s:
            job = await s.get(Job, slow, populate_existing=True)
        assert job is not None and job.worker_id.startswith(survivor.prefix) and job.attempts == 2
        await until(lambda: len(rec.terminal(slow)) == 1, what="delivery")

        # A store outage: the live host stops claiming and reports not-ready; the job waits, then finishes.
        proxy.down()

        async def reports_outage() -> bool:
            return any(w.id.startswith(survivor.prefix) and (w.info or {}).get("storage_error") for w in await rows())

        await until(reports_outage, limit=90, what="worker reports the store outage")
        waiting = (await sched.jobs.submit(t2v("during outage", steps=2), who(40), where(), "out")).job.id
        async with db.read() as s:
            assert (await s.get(Job, waiting)).state == "queued"  # type: ignore[union-attr]
        proxy.up()
        async with asyncio.timeout(60):
            back = await sched.views.wait(waiting)
        assert back.state == "succeeded" and back.output is not None
        assert await asyncio.to_thread(local_copy, settings, back.output.path) is not None
        await until(lambda: all(len(rec.terminal(j)) == 1 for j in [*ids, slow, waiting]), what="deliveries")
    finally:
        for h in hosts:
            h.stop()
        proxy.down()
        await sched.stop()
        await db.dispose()

