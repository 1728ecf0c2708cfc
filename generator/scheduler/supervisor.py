"""Spawns one worker process per configured device (or one worker group per ``gpus_per_job`` devices), watches
it, kills and restarts it.

Each worker is ``python -m generator.scheduler.worker`` in its own session (a Ctrl-C in the terminal
reaches only the parent, which then stops the workers). The worker's stdin is the only thing keeping it
alive: if this process dies, even by SIGKILL, the pipe closes and the worker exits.

Messages both ways are the typed ones of ``generator.scheduler.protocol``. May touch: worker processes
only (no database, no files). See docs/scheduler.md.

Watchdog: a worker is killed (SIGKILL) when it has been silent longer than the freshness rule
(``health.fresh_seconds``: ``max(watchdog_seconds, 3 x heartbeat_seconds)``), when it reports its
render stalled for ``watchdog_seconds``, or when it is still loading after ``worker_start_timeout_seconds``. After
any exit the ``on_exit`` callback runs (the scheduler requeues the worker's job and sweeps files), then the
worker is restarted with a backoff that grows while it keeps dying young.

Worker groups (``scheduler.gpus_per_job`` = N > 1, ``generator.scheduler.group``): each N consecutive devices
are one worker, one handle, one worker id. Rank 0 is the ordinary worker process (the only one that talks to
this supervisor and the database); ranks 1..N-1 are ``generator.scheduler.follower`` processes, each in its
own session with a stdin pipe like the worker's. The group lives and dies as one: when any of its processes
exits, the others are killed, ``on_exit`` runs once for the group's worker id, and the group is started again
(on a new rendezvous port). The watchdog watches rank 0; a hung follower stalls rank 0's render, so it is
covered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from generator.scheduler import protocol
from generator.scheduler.group import GroupSpec, backend_for
from generator.scheduler.health import fresh_seconds
from generator.scheduler.worker import ENGINE_FACTORY_ENV, encode_settings
from turbobot.config import Settings

log = logging.getLogger("turbobot.supervisor")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long restarts without delay


def new_run_id() -> str:
    """This supervisor's part of its workers' ids: pid plus a random token, unique per process start
    (a pid alone repeats across container restarts and PID namespaces)."""
    return f"{os.getpid()}.{secrets.token_hex(2)}"


def worker_ids(settings: Settings, run_id: str, host: str | None = None) -> list[str]:
    """``host:run:slot``. Two processes serving one database (``turbobot run`` and a ``turbobot generate``)
    must never share an id: a job is released by the id of the worker that holds it."""
    host = (host or socket.gethostname())[:40]  # ids are stored in 64-character columns
    return [f"{host}:{run_id}:{slot}" for slot in range(len(settings.scheduler.worker_groups))]


def device_env(device: str) -> dict[str, str]:
    if device.isdigit():
        return {"CUDA_VISIBLE_DEVICES": device}
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def group_env(devices: tuple[str, ...]) -> dict[str, str]:
    """Every rank of a group sees all of the group's GPUs (and uses the one at its rank; see ``group``)."""
    if all(d == "cpu" for d in devices):
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices)}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a group's rendezvous; a clash fails that start only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerHandle:
    slot: int
    worker_id: str
    device: str
    proc: asyncio.subprocess.Process | None = None
    state: str = "stopped"  # starting, idle, busy, stopped
    job_id: int | None = None
    spawned_at: float = 0.0
    last_message: float = 0.0
    stalled: bool = False
    restarts: int = 0
    kills: int = 0
    error: str = ""  # why the engine failed to load, until a later start succeeds
    info: dict[str, Any] = field(default_factory=dict)
    devices: tuple[str, ...] = ()  # a group's devices, rank by rank (empty: a worker of one device)
    followers: list[asyncio.subprocess.Process] = field(default_factory=list)  # a group's ranks 1..N-1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def follower_pids(self) -> list[int]:
        return [p.pid for p in self.followers if p.returncode is None]

    def processes(self) -> list[asyncio.subprocess.Process]:
        return [p for p in (self.proc, *self.followers) if p is not None]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        on_message: Callable[[WorkerHandle, protocol.WorkerMessage], None],
        on_exit: Callable[[WorkerHandle, int | None], Awaitable[None]],
        engine_factory: str | None = None,
        env: dict[str, str] | None = None,
        on_kill: Callable[[WorkerHandle], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_kill = on_kill
        self.cfg = settings.scheduler
        self._on_message = on_message
        self._on_exit = on_exit
        self._engine_factory = engine_factory
        self._env = dict(env or {})
        self._settings_line = encode_settings(settings) + "\n"
        self.run_id = new_run_id()
        ids = worker_ids(settings, self.run_id)
        self.handles = [
            WorkerHandle(slot, wid, devs[0], devices=devs if len(devs) > 1 else ())
            for slot, (wid, devs) in enumerate(zip(ids, settings.scheduler.worker_groups, strict=True))
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """``stop()`` has begun: workers exiting now were stopped on purpose."""
        return self._stopping.is_set()

    def start(self) -> None:
        for handle in self.handles:
            self._tasks.append(asyncio.create_task(self._run_slot(handle), name=f"worker-slot-{handle.slot}"))

    async def stop(self, grace: float = 5.0) -> None:
        """Close every worker's stdin (it exits at once), wait up to ``grace`` s, then SIGKILL."""
        self._stopping.set()
        for handle in self.handles:
            for proc in handle.processes():
                if proc.returncode is None and proc.stdin is not None:
                    with contextlib.suppress(Exception):
                        proc.stdin.close()
        deadline = time.monotonic() + grace
        for handle in self.handles:
            for proc in handle.processes():
                if proc.returncode is not None:
                    continue
                try:
                    await asyncio.wait_for(proc.wait(), timeout=max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        if self._tasks:
            # A worker spawned while we were stopping (stop() raced _spawn) is not in the loop above.
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            if pending:
                for handle in self.handles:
                    for proc in handle.processes():
                        if proc.returncode is None:
                            with contextlib.suppress(ProcessLookupError):
                                proc.kill()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- commands to workers --------------------------------------------------------------------
    def _send(self, handle: WorkerHandle, command: protocol.Command) -> None:
        proc = handle.proc
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            return
        with contextlib.suppress(Exception):
            proc.stdin.write(protocol.encode(command).encode())

    def wake(self) -> None:
        """New work was queued: idle workers claim now instead of at their next poll."""
        for handle in self.handles:
            if handle.state == "idle":
                self._send(handle, protocol.Wake())

    def cancel(self, job_id: int) -> None:
        for handle in self.handles:
            if handle.job_id == job_id:
                self._send(handle, protocol.CancelJob(job_id))

    def kill(self, worker_id: str) -> bool:
        """SIGKILL one worker (tests, admin); it is restarted like any crashed worker (a group: its rank 0,
        and the rest of the group goes with it)."""
        for handle in self.handles:
            if handle.worker_id == worker_id and handle.proc is not None and handle.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.proc.kill()
                return True
        return False

    # --- per slot -------------------------------------------------------------------------------
    async def _spawn(self, handle: WorkerHandle) -> asyncio.subprocess.Process:
        """The worker process (a group's rank 0); a group's followers are started too, into ``followers``."""
        devices = handle.devices
        env = {**os.environ, **self._env, **(group_env(devices) if devices else device_env(handle.device)),
               "PYTHONUNBUFFERED": "1"}
        if self._engine_factory:
            env[ENGINE_FACTORY_ENV] = self._engine_factory
        group: list[str] = []
        if devices:
            port = free_port()
            group = [GroupSpec(rank, len(devices), port, backend_for(devices)).arg() for rank in range(len(devices))]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "generator.scheduler.worker", "--worker-id", handle.worker_id,
            "--device", handle.device, "--restarts", str(handle.restarts), *(["--group", group[0]] if group else []),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(self._settings_line.encode())
        handle.followers = []
        try:
            for spec in group[1:]:
                follower = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "generator.scheduler.follower", "--worker-id", handle.worker_id,
                    "--group", spec, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env,
                    start_new_session=True,
                )
                assert follower.stdin is not None
                follower.stdin.write(self._settings_line.encode())
                handle.followers.append(follower)
        except BaseException:
            for p in (proc, *handle.followers):
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            raise
        return proc

    async def _wait_group(self, handle: WorkerHandle, proc: asyncio.subprocess.Process) -> int | None:
        """Until the worker exits, or any process of its group does (then the rest are killed): its exit code."""
        if not handle.followers:
            return await proc.wait()
        waits = {asyncio.ensure_future(p.wait()): p for p in (proc, *handle.followers)}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        rc = first.result()
        rank = [proc, *handle.followers].index(waits[first])
        if not self._stopping.is_set():
            log.warning("worker %s: rank %s (pid %s) exited with code %s; ending the group", handle.worker_id,
                        rank, waits[first].pid, rc)
        for p in waits.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        await asyncio.gather(*waits)
        return rc

    async def _run_slot(self, handle: WorkerHandle) -> None:
        backoff = MIN_BACKOFF
        while not self._stopping.is_set():
            try:
                proc = await self._spawn(handle)
            except Exception:
                log.exception("cannot start worker %s", handle.worker_id)
                rc: int | None = None
                proc = None
            else:
                assert proc is not None
                handle.proc = proc
                if self._stopping.is_set():  # spawned after stop() began: let it exit at once
                    for p in handle.processes():
                        if p.stdin is not None:
                            p.stdin.close()
                handle.state = "starting"
                handle.job_id = None
                handle.stalled = False
                handle.spawned_at = handle.last_message = time.monotonic()
                if handle.devices:
                    log.info("worker %s started: a group on devices %s (pids %s)", handle.worker_id,
                             ",".join(handle.devices), ",".join(str(p.pid) for p in handle.processes()))
                else:
                    log.info("worker %s started (pid %s, device %s)", handle.worker_id, proc.pid, handle.device)
                reader = asyncio.create_task(self._read(handle, proc))
                watchdog = asyncio.create_task(self._watchdog(handle, proc))
                rc = await self._wait_group(handle, proc)
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                handle.state = "stopped"
            lived = time.monotonic() - handle.spawned_at
            if handle.error:
                lived = 0.0  # a load failure is never "healthy": keep backing off
            if not self._stopping.is_set():
                log.warning("worker %s exited with code %s after %.1fs", handle.worker_id, rc, lived)
            try:
                await self._on_exit(handle, rc)
            except Exception:
                log.exception("cleanup after worker %s exit failed", handle.worker_id)
            handle.job_id = None
            if self._stopping.is_set():
                break
            handle.restarts += 1
            backoff = MIN_BACKOFF if lived > HEALTHY_AFTER else min(backoff * 2, MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff if proc is not None else MAX_BACKOFF)

    async def _read(self, handle: WorkerHandle, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            handle.last_message = time.monotonic()
            try:
                msg = protocol.decode_message(line)
            except protocol.ProtocolError:
                log.warning("worker %s wrote a non-protocol line: %r", handle.worker_id, line[:200])
                continue
            if isinstance(msg, protocol.Heartbeat):
                handle.stalled = msg.stalled
                handle.state = msg.state or handle.state
                handle.job_id = msg.job_id
            elif isinstance(msg, protocol.Ready):
                handle.state = "idle"
                handle.error = ""
                handle.info = dict(msg.info)
            elif isinstance(msg, protocol.Fatal):
                handle.state = "failed"
                handle.error = msg.error or "the engine could not be loaded"
            elif isinstance(msg, protocol.JobChanged):
                handle.job_id = None if msg.change == "done" else msg.job_id
                handle.state = "idle" if msg.change == "done" else "busy"
            try:
                self._on_message(handle, msg)
            except Exception:
                log.exception("handling a message from worker %s failed", handle.worker_id)

    async def _watchdog(self, handle: WorkerHandle, proc: asyncio.subprocess.Process) -> None:
        cfg = self.cfg
        interval = max(0.02, min(1.0, cfg.watchdog_seconds / 4, cfg.heartbeat_seconds))
        while proc.returncode is None:
            await asyncio.sleep(interval)
            now = time.monotonic()
            why = ""
            if handle.state == "starting":
                # Interpreter start, imports and model loading: only the start timeout applies.
                if now - handle.spawned_at > cfg.worker_start_timeout_seconds:
                    why = f"still loading after {cfg.worker_start_timeout_seconds:.0f}s"
            elif handle.stalled:
                why = "render stalled"
            elif now - handle.last_message > fresh_seconds(cfg):
                why = f"silent for {now - handle.last_message:.1f}s"
            if why:
                log.error("worker %s (pid %s): %s; killing it", handle.worker_id, proc.pid, why)
                handle.kills += 1
                if self._on_kill is not None:
                    self._on_kill(handle)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
