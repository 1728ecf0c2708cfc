"""The GPU worker process: ``python -m generator.scheduler.worker --worker-id ID --device DEV``.

One process per GPU, started by ``generator.scheduler.supervisor``. It talks to the database itself through
the narrow queue verbs (claim, heartbeat, progress, complete, fail), so its death is covered by leases.

Wire protocol with the supervisor (hints only; the database is the truth):
- stdin, first line: the settings as JSON. Then commands (``protocol.Wake``, ``protocol.CancelJob``). EOF on
  stdin means the parent is gone or wants us gone: exit at once (the lease or the supervisor requeues
  whatever was running).
- stdout: the messages of ``generator.scheduler.protocol`` (heartbeat, ready, fatal, job changed, stats
  updated), one per line. Anything else the process prints goes to stderr (stdout is re-pointed at
  startup).

Failures: ``OutOfMemory`` / ``torch.cuda.OutOfMemoryError`` fail that job and the worker keeps serving; any
other CUDA error poisons the process: it exits with code 3 without touching the job, and the supervisor
restarts it and requeues the job.

Worker groups (``--group``, ``scheduler.gpus_per_job`` > 1): this process is rank 0 of the group
(``generator.scheduler.group``); it announces each job to the followers just before rendering it. Only a
cancel and an ``EngineError`` (a refusal every rank meets alike) leave the group serving; an out-of-memory
error fails the job and then ends the process (code 5: the other ranks may be out of step), and any other
error ends it without touching the job (code 5, e.g. a rank died mid-exchange): the supervisor restarts the
whole group and the lease requeues the job. The render runs in one dedicated thread so the asyncio loop keeps
heartbeating; a render that stops calling back for ``watchdog_seconds`` is reported stalled and its lease
is no longer extended, so the supervisor kills the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.exc import DBAPIError

from generator.engine.api import EngineError, JobCancelled, OutOfMemory, Progress, RenderJob, RenderResult
from generator.engine.extend import join_videos
from generator.media import video_file_name
from generator.request import GenerationRequest
from generator.scheduler import protocol, queue
from generator.scheduler.api import Phase
from generator.scheduler.disk import storage_problem
from generator.scheduler.estimate import Shape, StepStats
from generator.scheduler.filestore import make_store
from generator.scheduler.group import GroupLink, GroupSpec
from generator.scheduler.health import fresh_seconds
from generator.scheduler.image_moderation import BLOCKED_OUTPUT_MESSAGE, ImageModerator, image_moderator
from generator.scheduler.previews import PreviewPublisher
from storage.db import DB_NOW, Database, db_now
from storage.repo_workers import register_worker, update_worker
from turbobot.config import Settings, settings_from_dict
from turbobot.logs import setup_logging

log = logging.getLogger("turbobot.worker")

ENGINE_FACTORY_ENV = "TURBOBOT_ENGINE_FACTORY"
DEFAULT_ENGINE_FACTORY = "generator.scheduler.engine_options:default_engine"
EXIT_CUDA_FATAL = 3
PARTIAL_PREFIX = ".partial-job"
ROW_HEARTBEAT_MIN_SECONDS = 2.0
EXIT_LOAD_FAILED = 4
EXIT_GROUP_BROKEN = 5
# Engine stages -> the phase front ends show (the engine knows nothing of the scheduler's words).
PHASE_OF_STAGE: dict[str, Phase] = {"text": "text", "denoise": "sampling", "decode": "decoding", "encode": "encoding"}

OOM_MESSAGE = (
    "The GPU ran out of memory making this video. Try fewer frames or a lower resolution."
)
INTERNAL_MESSAGE = "Something went wrong while making this video. The admins can find the details in the logs."


# --- settings over the pipe ---------------------------------------------------------------------------


def encode_settings(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def decode_settings(text: str) -> Settings:
    data = json.loads(text)
    source = data.pop("source", "")
    base_dir = data.pop("base_dir", ".")
    return settings_from_dict(data, source=source, base_dir=base_dir)


# --- engine loading -----------------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[Settings], Any]:
    """``package.module:function`` or ``/path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"engine factory must look like 'module:function', got {spec!r}")
    if target.endswith(".py"):
        mod_name = "turbobot_engine_factory_" + hashlib.sha1(target.encode()).hexdigest()[:8]
        mod_spec = importlib.util.spec_from_file_location(mod_name, target)
        if mod_spec is None or mod_spec.loader is None:
            raise ValueError(f"cannot load engine factory file {target}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def factory_spec() -> str:
    return os.environ.get(ENGINE_FACTORY_ENV, "").strip() or DEFAULT_ENGINE_FACTORY


# --- error classification -----------------------------------------------------------------------------

_FATAL_CUDA_MARKERS = (
    "CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert", "illegal memory access",
    "NCCL error", "unspecified launch failure",
)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, OutOfMemory):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "CUDA" in str(exc)


def is_fatal_cuda(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    accel = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_CUDA_MARKERS)


def free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- files --------------------------------------------------------------------------------------------


def attempt_file_name(job_id: int, attempt: int, request: GenerationRequest) -> str:
    """Server-generated final name (mode, job, seed, model; never user text), e.g.
    ``t2v_12_42_tiny-t2v.a1.mp4``; the attempt keeps a fenced-out straggler from touching the winner."""
    return video_file_name(request.mode, job_id, request.seed or 0, request.model or "model", ext=f"a{attempt}.mp4")


def partial_name(job_id: int, attempt: int) -> str:
    return f"{PARTIAL_PREFIX}{job_id}-{attempt}-{os.urandom(4).hex()}.mp4"


def fsync_and_hash(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- the running job ----------------------------------------------------------------------------------


@dataclass
class RunningJob:
    job_id: int
    attempt: int
    shape: Shape
    request: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: bool = False
    t0: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    first_step_start: float | None = None
    last_step_end: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    last_step_at: float | None = None
    age_restricted_ok: bool = False  # the place it goes allows age-restricted content (output moderation)
    previews: PreviewPublisher | None = None  # live previews of this attempt (None: off)


class Worker:
    def __init__(
        self, settings: Settings, worker_id: str, device: str, send: Callable[[protocol.WorkerMessage], None],
        restarts: int = 0, group: GroupSpec | None = None,
    ) -> None:
        self.group = group  # rank 0 of a worker group, or None for a worker of one device
        self.link: GroupLink | None = None  # joined on the render thread, before the engine is built
        self.settings = settings
        self.restarts = restarts  # times the supervisor restarted this slot since the service started
        self.cfg = settings.scheduler
        self.worker_id = worker_id
        self.device = device
        self.send = send
        self.outputs = settings.path(settings.app.outputs_dir).resolve()
        self.stats = StepStats()
        self.state = "starting"
        self.current: RunningJob | None = None
        # The LoRA set of the last job rendered (its files are in the engine's cache): the claim prefers it.
        self.resident_loras = ""
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="render")
        self.engine: Any = None
        self.engine_info: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.db: Database | None = None
        self.storage_error = ""  # why outputs cannot be written now ("" = fine); no claims meanwhile
        # Inputs and outputs: the local folders, or an object store shared with hosts elsewhere (then
        # ``self.outputs`` is only the scratch folder where videos are rendered before the upload).
        self.store = make_store(settings)
        # Output moderation ([moderation] image_model): loaded on the first finished render.
        self.images: ImageModerator | None = image_moderator(settings, device)

    # Called from the stdin thread.
    def command(self, line: str) -> None:
        if not line.strip() or self.loop is None:
            return
        try:
            cmd = protocol.decode_command(line)
        except protocol.ProtocolError:
            log.warning("worker %s: ignoring a non-protocol command %r", self.worker_id, line[:200])
            return
        if isinstance(cmd, protocol.Wake):
            self.loop.call_soon_threadsafe(self.wake.set)
        else:
            cur = self.current
            if cur is not None and cur.job_id == cmd.job_id:
                cur.cancel.set()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        db_cfg = self.settings.database
        self.db = Database(
            self.settings.database_url, busy_timeout_ms=db_cfg.busy_timeout_ms, synchronous=db_cfg.synchronous
        )
        async with self.db.write() as s:
            row = await register_worker(
                s, self.worker_id, pid=os.getpid(), device=self.device,
                info={"host": socket.gethostname(), "pid": os.getpid()}, now=await db_now(s), restarts=self.restarts,
            )
            self.stats = StepStats.from_dict((row.info or {}).get("ema"))
        hb = asyncio.create_task(self._heartbeat_loop())
        try:
            try:
                await self.loop.run_in_executor(self.executor, self._build_engine)
                warm_up = getattr(self.engine, "warm_up", None)
                if warm_up is not None:
                    self.state = "warming_up"  # loaded, compiling: /readyz and the admin page say so
                    await self._save_worker_row()
                    await self.loop.run_in_executor(self.executor, warm_up)
            except Exception as exc:
                await self._load_failed(exc)
                return
            self.state = "idle"
            await self._save_worker_row()
            self.send(protocol.Ready(info=self.engine_info))
            while True:
                claimed = await self._claim() if await self._storage_ok() else None
                if claimed is None:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=self.cfg.poll_seconds)
                    continue
                await self._run(claimed)
        finally:
            hb.cancel()

    async def _storage_ok(self) -> bool:
        """Claim only while a finished video can be written: with a full or read-only disk, jobs stay queued
        (rendering them would only fail each at the end) and the worker resumes once it is fixed."""
        problem = await asyncio.to_thread(storage_problem, [self.outputs], self.settings.app.min_free_bytes)
        if not problem and self.store.kind != "local":
            problem = await asyncio.to_thread(self.store.problem)
        if problem != self.storage_error:
            if problem:
                log.error("worker %s: not taking jobs: %s", self.worker_id, problem)
            else:
                log.info("worker %s: storage is usable again; taking jobs", self.worker_id)
            self.storage_error = problem
            await self._save_worker_row()  # the admin page shows why the worker is not taking jobs
        return not problem

    async def _load_failed(self, exc: Exception) -> None:
        """Tell the supervisor why (it keeps retrying with a growing delay) and exit."""
        message = exc.user_message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        log.error("worker %s: the engine could not be loaded:\n%s", self.worker_id, traceback.format_exc())
        self.state = "failed"
        self.send(protocol.Fatal(error=message[:500]))
        with contextlib.suppress(Exception):
            await self._write(
                update_worker, self.worker_id, now=DB_NOW, state="failed", info={"error": message[:500]}
            )
        sys.stderr.flush()
        os._exit(EXIT_LOAD_FAILED)

    def _build_engine(self) -> None:
        if self.group is not None:  # the engine's context parallelism runs over the group's default group
            self.link = GroupLink.join(self.group, timeout_s=self.cfg.worker_start_timeout_seconds)
        factory = load_factory(factory_spec())
        self.engine = factory(self.settings)
        self.engine.load()
        try:
            self.engine_info = {k: v for k, v in dict(self.engine.info).items() if _jsonable(v)}
        except Exception:  # info is for display only
            self.engine_info = {}

    async def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one queue verb in its own write transaction, retrying transient lock errors.
        Only while no render or engine load runs (see ``_write_each``)."""
        assert self.db is not None
        return await self._retry(self.db.write, fn, *args, **kwargs)

    async def _write_each(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """For the writes made while the render thread works (lease, progress, worker row): every
        statement commits on its own, so the database's write lock is never held while this process waits
        for the interpreter lock that the render thread may keep for seconds (``Database.write_each``)."""
        assert self.db is not None
        return await self._retry(self.db.write_each, fn, *args, **kwargs)

    async def _retry(
        self, begin: Callable[[], Any], fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        delay = 0.05
        for attempt in range(6):
            try:
                async with begin() as s:
                    if kwargs.get("now") is DB_NOW:  # the database's clock, not this host's (skew)
                        kwargs = {**kwargs, "now": await db_now(s)}
                    return await fn(s, *args, **kwargs)
            except DBAPIError as exc:
                if attempt == 5:
                    raise
                log.warning("worker %s: database error (%s); retrying", self.worker_id, exc.orig)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self.db is not None
        async with self.db.read() as s:
            return await fn(s, *args, **kwargs)

    async def _save_worker_row(self) -> None:
        info = {
            **self.engine_info, "host": socket.gethostname(), "pid": os.getpid(), "ema": self.stats.to_dict(),
        }
        if self.storage_error:
            info["storage_error"] = self.storage_error
        await self._write_each(update_worker, self.worker_id, now=DB_NOW, state=self.state, info=info)

    async def _claim(self) -> queue.Claimed | None:
        try:
            return await self._write(
                queue.claim,
                worker_id=self.worker_id,
                now=DB_NOW,
                lease_seconds=self.cfg.lease_seconds,
                max_running_per_user=self.settings.quotas.max_running_per_user,
                postgres=not self.db.sqlite if self.db else False,
                prefer_loras=self.resident_loras,
            )
        except DBAPIError:
            log.exception("worker %s: claim failed", self.worker_id)
            await asyncio.sleep(self.cfg.poll_seconds)
            return None

    async def _heartbeat_loop(self) -> None:
        """Liveness to the supervisor every heartbeat; to the workers table (for /readyz) less often."""
        last_row = 0.0
        while True:
            now_m = time.monotonic()
            cur = self.current
            stalled = cur is not None and now_m - cur.last_activity > self.cfg.watchdog_seconds
            self.send(protocol.Heartbeat(
                state=self.state, job_id=cur.job_id if cur else None, stalled=stalled,
                activity_age=round(now_m - cur.last_activity, 3) if cur else 0.0,
            ))
            if now_m - last_row >= row_heartbeat_seconds(self.settings):
                last_row = now_m
                try:
                    await self._write_each(update_worker, self.worker_id, now=DB_NOW, state=self.state)
                except DBAPIError:
                    log.exception("worker %s: heartbeat write failed", self.worker_id)
            await asyncio.sleep(self.cfg.heartbeat_seconds)

    async def _watch(self, job: RunningJob) -> None:
        """Every heartbeat: extend the lease (unless the render stalled) and look for a cancel request.
        (Cancels also arrive faster: pushed on stdin by a local supervisor, and with each progress write.)"""
        while not job.cancel.is_set():
            await asyncio.sleep(self.cfg.heartbeat_seconds)
            stalled = time.monotonic() - job.last_activity > self.cfg.watchdog_seconds
            try:
                if stalled:
                    status = await self._read(queue.lease_status, job.job_id, job.attempt)
                else:
                    status = await self._write_each(
                        queue.heartbeat, job.job_id, job.attempt, now=DB_NOW, lease_seconds=self.cfg.lease_seconds
                    )
            except DBAPIError:
                log.exception("worker %s: job %s heartbeat failed", self.worker_id, job.job_id)
                continue
            if not status.alive:
                job.lost = True
                job.cancel.set()
            elif status.cancel_requested:
                job.cancel.set()

    async def _pump(self, job: RunningJob, events: asyncio.Queue[Progress | None]) -> None:
        """Write progress to the job row in order (fenced) and hint the scheduler."""
        while True:
            item = await events.get()
            if item is None:
                return
            try:
                status = await self._write_each(
                    queue.progress, job.job_id, job.attempt, item.step, item.total, now=DB_NOW,
                    lease_seconds=self.cfg.lease_seconds, phase=PHASE_OF_STAGE.get(item.stage, "sampling"),
                )
            except DBAPIError:
                log.exception("worker %s: job %s progress write failed", self.worker_id, job.job_id)
                continue
            if not status.alive:
                job.lost = True
                job.cancel.set()
            elif status.cancel_requested:
                job.cancel.set()
            self.send(protocol.JobChanged(job.job_id, "progress"))

    def _render(self, rj: RenderJob, job: RunningJob, events: asyncio.Queue[Progress | None]) -> RenderResult:
        loop = self.loop
        assert loop is not None

        def on_progress(p: Progress) -> None:
            now_m = time.monotonic()
            job.last_activity = now_m
            if p.stage == "denoise" and p.step > 0:
                dt_step = p.step_seconds
                if dt_step is None:
                    dt_step = now_m - (job.last_step_at or job.t0)
                if job.first_step_start is None:
                    job.first_step_start = now_m - dt_step
                job.step_seconds.append(float(dt_step))
                job.last_step_at = now_m
                if p.step >= p.total:
                    job.last_step_end = now_m
            elif p.stage == "denoise":
                job.last_step_at = now_m
            if p.preview is not None:
                # Encoded and stored on the event loop's side (threads), never here between sampler steps.
                if job.previews is not None:
                    loop.call_soon_threadsafe(job.previews.offer, p.preview)
                p = dataclasses.replace(p, preview=None)
            loop.call_soon_threadsafe(events.put_nowait, p)

        def is_cancelled() -> bool:
            job.last_activity = time.monotonic()
            return job.cancel.is_set()

        if self.link is not None:
            self.link.announce(rj)  # here, on the render thread: the followers start exactly the jobs we render
        return self.engine.render(rj, progress=on_progress, cancelled=is_cancelled)

    async def _run(self, claimed: queue.Claimed) -> None:
        assert self.loop is not None
        try:
            request = claimed.request
            shape = Shape.from_request(request)
        except Exception:  # a stored request this version cannot read: fail it rather than crash-loop
            log.error("worker %s: job %s has an unreadable request:\n%s", self.worker_id, claimed.job_id,
                      traceback.format_exc())
            await self._write(
                queue.finish, claimed.job_id, claimed.attempt, state="failed", code="bad_request",
                message=INTERNAL_MESSAGE, now=DB_NOW,
            )
            self.send(protocol.JobChanged(claimed.job_id, "done"))
            return
        job = RunningJob(claimed.job_id, claimed.attempt, shape, request, age_restricted_ok=claimed.age_restricted_ok)
        self.current = job
        self.state = "busy"
        self.send(protocol.JobChanged(job.job_id, "started"))
        tmp = self.outputs / partial_name(job.job_id, job.attempt)
        image = Path(claimed.input_path) if claimed.input_path else None
        fetched: Path | None = None
        if claimed.input_path and self.store.kind != "local":
            # From the object store to a local file the engine can read; removed after the render.
            fetched = self.outputs / f".input-job{job.job_id}-{job.attempt}-{os.urandom(4).hex()}.png"
            try:
                image = await asyncio.to_thread(self.store.fetch, claimed.input_path, fetched)
            except Exception as exc:
                # The store is down: give the job back (the attempt not counted) instead of failing it.
                log.warning("worker %s: job %s input could not be downloaded; handed back: %s",
                            self.worker_id, job.job_id, exc)
                await self._write(queue.hand_back, job.job_id, job.attempt, now=DB_NOW)
                self.current = None
                self.state = "idle"
                self.send(protocol.JobChanged(job.job_id, "done", fenced=True))
                return
        if self.previews_on:
            job.previews = PreviewPublisher(
                self.store, job.job_id, job.attempt, record=lambda ref, v: self._record_preview(job, ref, v),
                notify=lambda: self.send(protocol.JobChanged(job.job_id, "progress")),
            )
        events: asyncio.Queue[Progress | None] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(job, events))
        watch = asyncio.create_task(self._watch(job))
        outcome: tuple[str, Any] = ("", None)
        leave_group = False  # a group whose ranks may be out of step ends after the job is recorded
        try:
            if request.mode == "i2v" and (image is None or not image.exists()):
                outcome = ("fail", ("input_missing", "The input image of this job is no longer stored."))
            else:
                # A draft ("--draft" / decoder "tiny") forces the tiny decoder; otherwise the model's own setting.
                rj = RenderJob(job_id=job.job_id, request=request, image_path=image, output_path=tmp,
                               decoder="tiny" if request.decoder == "tiny" else None,
                               preview_interval_s=self.cfg.preview_interval_seconds if job.previews else None)
                self.resident_loras = request.loras
                result = await self.loop.run_in_executor(self.executor, self._render, rj, job, events)
                if request.extends is not None:
                    result = await self._join_parent(request.extends, result, tmp)
                outcome = ("ok", result)
        except JobCancelled:
            outcome = ("cancel", None)
        except Exception as exc:
            if is_oom(exc):
                log.warning("worker %s: job %s ran out of GPU memory: %s", self.worker_id, job.job_id, exc)
                await self.loop.run_in_executor(self.executor, free_gpu_memory)
                msg = exc.user_message if isinstance(exc, EngineError) else OOM_MESSAGE
                outcome = ("fail", ("out_of_memory", msg))
                leave_group = self.link is not None
            elif is_fatal_cuda(exc):
                log.critical("worker %s: CUDA error in job %s; exiting: %s", self.worker_id, job.job_id, exc)
                unlink_quietly(tmp)
                sys.stderr.flush()
                os._exit(EXIT_CUDA_FATAL)
            elif self.link is not None and not isinstance(exc, EngineError):
                log.critical("worker %s: job %s broke off in the group; restarting the group:\n%s",
                             self.worker_id, job.job_id, traceback.format_exc())
                unlink_quietly(tmp)
                sys.stderr.flush()
                os._exit(EXIT_GROUP_BROKEN)
            elif isinstance(exc, EngineError):
                outcome = ("fail", (exc.code, exc.user_message))
            else:
                log.error("worker %s: job %s failed:\n%s", self.worker_id, job.job_id, traceback.format_exc())
                outcome = ("fail", ("internal_error", INTERNAL_MESSAGE))
        finally:
            watch.cancel()
            events.put_nowait(None)
            await pump  # every progress write lands before the terminal one
            if fetched is not None:
                unlink_quietly(fetched)
        accepted = False
        try:
            if job.previews is not None:  # the last one lands (or not) before the outcome is written
                await job.previews.close_publishing()
            accepted = await self._finish(job, outcome, tmp)
        finally:
            self.current = None
            self.state = "idle"
            self.send(protocol.JobChanged(job.job_id, "done", fenced=not accepted))
            if job.previews is not None:  # the job no longer shows them: delete its preview files
                await job.previews.close()
        if leave_group:
            log.error("worker %s: ran out of memory in a group job; restarting the group", self.worker_id)
            sys.stderr.flush()
            os._exit(EXIT_GROUP_BROKEN)
        if job.step_seconds:
            await self._save_worker_row()  # after the hint: the terminal event need not wait for this
            self.send(protocol.StatsUpdated())  # new step-time averages: ETAs can use them now

    @property
    def previews_on(self) -> bool:
        """Live previews are configured, and no output filter is: previews reach the chat unchecked."""
        return bool(self.cfg.previews) and self.images is None

    async def _record_preview(self, job: RunningJob, ref: str, version: int) -> bool:
        try:
            ok = bool(await self._write_each(queue.set_preview, job.job_id, job.attempt, ref, version))
        except DBAPIError:
            log.exception("worker %s: job %s preview write failed", self.worker_id, job.job_id)
            return True  # the next one may land
        return ok and not job.cancel.is_set()

    async def _join_parent(self, parent_id: int, result: RenderResult, tmp: Path) -> RenderResult:
        """An Extend: the parent's video followed by this render's frames (the shared first frame once)."""
        parent = await self._read(queue.accepted_output, parent_id)
        if parent is None or not await asyncio.to_thread(Path(parent).is_file):
            raise EngineError(f"The video of job #{parent_id} is no longer stored, so it cannot be extended.",
                              code="parent_missing")
        produced = Path(result.path)
        joined = self.outputs / partial_name(parent_id, 0)
        try:
            frames, width, height = await asyncio.to_thread(join_videos, parent, produced, joined, fps=result.fps)
        except BaseException:
            unlink_quietly(joined)
            raise
        if produced != tmp:
            unlink_quietly(produced)
        await asyncio.to_thread(os.replace, joined, tmp)
        return dataclasses.replace(
            result, path=tmp, frames=frames, width=width, height=height, duration_s=frames / result.fps,
            bytes=(await asyncio.to_thread(tmp.stat)).st_size,
        )

    async def _finish(self, job: RunningJob, outcome: tuple[str, Any], tmp: Path) -> bool:
        """Record the outcome (fenced). False when the lease was lost and the result was discarded."""
        gpu_seconds = time.monotonic() - job.t0
        kind, payload = outcome
        if kind != "ok":
            unlink_quietly(tmp)
            if job.lost:
                log.info("worker %s: job %s lease lost; result discarded", self.worker_id, job.job_id)
                return False
            state, code, msg = ("cancelled", "cancelled", "Cancelled.") if kind == "cancel" else ("failed", *payload)
            return bool(await self._write(
                queue.finish, job.job_id, job.attempt, state=state, code=code, message=msg,
                gpu_seconds=gpu_seconds, timings={"total": gpu_seconds}, now=DB_NOW,
            ))
        result: RenderResult = payload
        produced = Path(result.path)
        labels = await self._moderate(job, produced)
        if labels is None:
            # Unchecked, so never delivered: the file is removed before anything could serve it.
            unlink_quietly(produced)
            unlink_quietly(tmp)
            if job.lost:
                return False
            return bool(await self._write(
                queue.finish, job.job_id, job.attempt, state="failed", code="moderation_error",
                message="The finished video could not be checked by the moderation filter, so it was not "
                        "delivered. Please try again later.",
                gpu_seconds=gpu_seconds, timings={"total": gpu_seconds}, now=DB_NOW,
            ))
        if labels and job.lost:
            unlink_quietly(produced)
            unlink_quietly(tmp)
            return False
        # A held video is stored like any other (same name, same store) but recorded apart from outputs:
        # nothing serves or delivers it unless an admin releases it.
        final = self.outputs / attempt_file_name(job.job_id, job.attempt, job.request)
        sha, size = await asyncio.to_thread(fsync_and_hash, produced)
        stored = str(final)
        if self.store.kind == "local":
            await asyncio.to_thread(publish, produced, final)
        else:
            # Atomic upload under the final name; the lease keeps running meanwhile. If it fails, the
            # job is not completed and the lease hands it to another claim (the sweep removes leftovers).
            try:
                stored = await asyncio.to_thread(self.store.put_file, "outputs", final.name, produced)
            except Exception as exc:
                # The store went away: give the job back (the attempt not counted); it is rendered again
                # once the store answers (no claims meanwhile). Nothing is lost.
                log.warning("worker %s: job %s output could not be uploaded; handed back: %s",
                            self.worker_id, job.job_id, exc)
                self.store.invalidate()  # re-checked (and reported) before the next claim
                await self._write(queue.hand_back, job.job_id, job.attempt, now=DB_NOW)
                return False
            finally:
                unlink_quietly(produced)
        if produced != tmp:
            unlink_quietly(tmp)
        timings = {k: float(v) for k, v in (result.timings or {}).items() if isinstance(v, (int, float))}
        timings["total"] = gpu_seconds
        pre = (job.first_step_start or job.t0) - job.t0
        post = time.monotonic() - (job.last_step_end or job.t0)
        if job.step_seconds:
            timings["step_mean"] = sum(job.step_seconds) / len(job.step_seconds)
        info = queue.OutputInfo(
            path=stored, sha256=sha, bytes=size, duration_s=float(result.duration_s), width=int(result.width),
            height=int(result.height), frames=int(result.frames), fps=int(result.fps),
            model_label=str(result.model_label), is_demo=bool(result.is_demo),
        )
        if labels:
            log.info("worker %s: job %s output held by moderation (%s)", self.worker_id, job.job_id, ", ".join(labels))
            try:
                held = await self._write(
                    queue.block_output, job.job_id, job.attempt, labels=labels, message=BLOCKED_OUTPUT_MESSAGE,
                    gpu_seconds=gpu_seconds, now=DB_NOW, held=info,
                )
            except BaseException:
                await self._discard(stored)  # not recorded; the lease will requeue the job
                raise
            if not held:
                await self._discard(stored)
            return bool(held)
        try:
            verdict = await self._write(
                queue.complete, job.job_id, job.attempt, info, gpu_seconds=gpu_seconds, timings=timings, now=DB_NOW
            )
        except BaseException:
            await self._discard(stored)  # not accepted; the lease will requeue the job
            raise
        if verdict == "lost" and await self._read(queue.accepted_output, job.job_id) == stored:
            verdict = "succeeded"  # a retried commit that had in fact gone through
        if verdict != "succeeded":
            await self._discard(stored)
            log.info("worker %s: job %s completion %s; file removed", self.worker_id, job.job_id, verdict)
        if job.step_seconds:
            self.stats.record(job.shape, pre_s=pre, step_s=job.step_seconds, post_s=post)
        return verdict != "lost"


    async def _moderate(self, job: RunningJob, video: Path) -> list[str] | None:
        """The labels that hold this output ([] = deliver it); None when the check itself failed (the
        output is then not delivered either: an unchecked video must not reach a community)."""
        if self.images is None:
            return []
        assert self.loop is not None
        try:
            # On the render thread: the classifier may share the GPU with the engine.
            return await self.loop.run_in_executor(
                self.executor, lambda: self.images.blocked_video(video, age_restricted_ok=job.age_restricted_ok)
                if self.images is not None else [])
        except Exception:
            log.error("worker %s: output moderation of job %s failed:\n%s", self.worker_id, job.job_id,
                      traceback.format_exc())
            return None

    async def _discard(self, stored: str) -> None:
        if self.store.kind == "local":
            unlink_quietly(Path(stored))
            return
        try:
            await asyncio.to_thread(self.store.delete, stored)
        except Exception as exc:  # the sweep removes it later
            log.warning("worker %s: could not delete %s now: %s", self.worker_id, stored, exc)


def row_heartbeat_seconds(settings: Settings) -> float:
    """How often the worker row's heartbeat is written: rarely, but well within the freshness window
    (``health.fresh_seconds``) that /readyz and the scheduler use."""
    cfg = settings.scheduler
    fresh = fresh_seconds(cfg)
    return min(max(cfg.heartbeat_seconds, ROW_HEARTBEAT_MIN_SECONDS), fresh / 3)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --- process entry ------------------------------------------------------------------------------------


class _Wire:
    """Line-oriented JSON to the supervisor; a broken pipe means the parent died: exit."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, msg: protocol.WorkerMessage) -> None:
        data = protocol.encode(msg)
        try:
            with self.lock:
                self.stream.write(data)
                self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            os._exit(0)


def _watch_stdin(worker: Worker) -> None:
    for line in sys.stdin:
        worker.command(line.strip())
    # Parent closed the pipe (or died): leave now; leases cover the running job.
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator.scheduler.worker")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--restarts", type=int, default=0, help="restarts of this slot so far (from the supervisor)")
    parser.add_argument("--group", default="", help="rank,size,port,backend: rank 0 of a worker group")
    args = parser.parse_args(argv)

    # Keep the protocol stream private: stray prints from libraries go to stderr.
    wire = _Wire(os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    settings = decode_settings(sys.stdin.readline())
    # The parent's format, so worker lines read like the rest of the terminal (and secrets stay redacted).
    setup_logging(settings.app.log_level, settings.app.log_format, sys.stderr, process=f"worker[{args.worker_id}]")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    group = GroupSpec.parse(args.group) if args.group else None
    worker = Worker(settings, args.worker_id, args.device, wire.send, restarts=args.restarts, group=group)
    threading.Thread(target=_watch_stdin, args=(worker,), daemon=True, name="stdin").start()
    try:
        asyncio.run(worker.run())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
