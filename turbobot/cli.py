"""The ``turbobot`` command: db upgrade/check, generate (one job), run (bots + console + worker), jobs.

Every path goes through the same storage and scheduler the bots use; nothing here renders directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from generator.params import PARAMS, Limits
from turbobot.config import ConfigError, Settings, check_worker_groups, load_settings, read_secret

log = logging.getLogger("turbobot")

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------------------------- args
def _add_request_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation options (the same as the chat --flags)")
    g.add_argument("--image", type=Path, help="local image to animate (makes the job image-to-video)")
    g.add_argument("--mode", choices=("t2v", "i2v"), help="default: i2v with --image, else t2v")
    for prm in PARAMS:  # every declared parameter, spelled as its chat flags
        if prm.flags:
            # Ranges as the documented [limits] state them; the configured ones are enforced at submit.
            g.add_argument(*(f"--{f}" for f in prm.flags), dest=prm.name, type=prm.kind,
                           action="append" if prm.repeatable else "store",
                           help=f"{prm.help}: {prm.describe(Limits())}")
        for spelling, value in prm.switches:
            g.add_argument(f"--{spelling}", dest=prm.name, action="store_const", const=value, default=None,
                           help=f"{prm.label}: {prm.shown(value)}")


class _Parser(argparse.ArgumentParser):
    """An error in a subcommand's arguments shows that subcommand's usage, not the top-level one.

    argparse parses a subcommand's arguments with the subparser but collects unknown ones for the parent,
    which then reports them with its own usage; here each parser refuses unknown arguments itself.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != "turbobot":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="turbobot",
        description="Chat bots that turn messages into short videos (TurboDiffusion-style Wan models).",
    )
    parser.add_argument("--config", type=Path, help="config file (default: $TURBOBOT_CONFIG or ./config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, the GPU worker's included (secrets stay redacted)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION", parser_class=_Parser)
    db_sub.add_parser("upgrade", help="create or migrate the database to the latest schema")
    db_sub.add_parser("check", help="fail if the models and the migrations disagree")

    gen = sub.add_parser("generate", help="make one video through the scheduler and print where it is")
    gen.add_argument("prompt", nargs="*", help="what to make; inline --flags work here too when quoted")
    gen.add_argument("--extend", type=int, metavar="JOB",
                     help="continue job JOB's video from its last frame (prompt optional: default the job's)")
    _add_request_options(gen)
    gen.add_argument("--out", type=Path, help="also copy the finished mp4 here")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = sub.add_parser("run", help="start the configured bots, the web console and the GPU worker")
    run.add_argument("--no-workers", action="store_true",
                     help="bots and console only: GPU workers run elsewhere (`turbobot worker` on GPU hosts)")

    worker = sub.add_parser(
        "worker", help="run GPU workers only, against the configured database and file store (a GPU host)"
    )
    worker.add_argument("--devices", type=_devices,
                        help="comma-separated devices, e.g. cuda:0,cuda:1 or cpu (default: scheduler.worker_devices)")

    jobs = sub.add_parser("jobs", help="list recent jobs with state and seed")
    jobs.add_argument("-n", "--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true")

    ready = sub.add_parser("ready", help="is the service ready (database, a fresh GPU worker, storage)? exit 0 if so")
    ready.add_argument("--json", action="store_true", help="print what /readyz answers")
    return parser


# ------------------------------------------------------------------------------------------- helpers
def _devices(text: str) -> tuple[str, ...]:
    """``cuda:0,cuda:1`` / ``0,1`` / ``cpu`` / ``auto`` -> scheduler.worker_devices entries."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part.startswith("cuda:"):
            part = part.removeprefix("cuda:")
        if part not in ("auto", "cpu") and not part.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not a device: use cuda:N, N, cpu or auto")
        out.append(part)
    if not out:
        raise argparse.ArgumentTypeError("list at least one device")
    return tuple(out)


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    return {p.name: ",".join(v) if isinstance(v := getattr(args, p.name, None), list) else v
            for p in PARAMS if getattr(args, p.name, None) is not None}


def _local_requester() -> Any:
    from generator.scheduler.api import Requester

    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        name = "local"
    return Requester(platform="cli", user_id=name, display_name=name)


class _ProgressPrinter:
    """A one-line progress bar on stderr (only when it is a terminal, unless forced)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = ""

    def show(self, text: str) -> None:
        if not self.enabled or text == self.last:
            return
        self.last = text
        sys.stderr.write("\r\033[K" + text if sys.stderr.isatty() else text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and sys.stderr.isatty() and self.last:
            sys.stderr.write("\n")


def _phase_progress(job: Any, bar: Any) -> str:
    """``[k/4] phase`` with the phase's own progress: a step bar while sampling, words for the others
    (decoding and the mp4 encode have no steps), instead of sitting at "step n/n 100%" through them."""
    from generator.scheduler.api import PHASES

    phase = job.progress_phase or ("sampling" if job.progress_total else "")
    if phase not in PHASES:
        return "starting…"
    where = f"[{PHASES.index(phase) + 1}/{len(PHASES)}]"
    if phase == "sampling":
        total = job.progress_total or job.request.steps
        return f"{where} sampling {bar(job.progress_step, total)} step {job.progress_step}/{total}"
    return f"{where} " + {"text": "encoding the prompt…", "decoding": "decoding the video…",
                          "encoding": "encoding the mp4…"}[phase]


async def _open_database(settings: Settings) -> Any:
    from storage.db import open_database
    from storage.migrate import upgrade_database

    await upgrade_database(settings.database_url)
    return open_database(settings)


# ------------------------------------------------------------------------------------------ commands
async def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from storage.migrate import check_migrations, upgrade_database

    url = settings.database_url
    await upgrade_database(url)
    if args.db_command == "upgrade":
        print(f"Database is up to date: {_safe_url(url)}")
        return 0
    diffs = await asyncio.to_thread(check_migrations, url)
    if diffs:
        print("Models and migrations disagree:", file=sys.stderr)
        for d in diffs:
            print(f"  {d}", file=sys.stderr)
        return EXIT_FAILED
    print("Models and migrations agree.")
    return 0


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _file_kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(st_mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB"


def _read_image_file(path: Path, max_bytes: int) -> bytes:
    """Read a local input image: only a regular file, and never more than the upload limit.

    /dev/zero or /dev/urandom would otherwise be read forever and a FIFO with no writer would block: the file
    is opened non-blocking (a FIFO open returns at once) and checked with fstat on the open descriptor
    before a single byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise UserError(f"Cannot read image {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"Cannot use {path} as an image: it is {_file_kind(st.st_mode)}, not a regular file.")
        if st.st_size > max_bytes:
            raise UserError(f"Image {path} is too big ({_size(st.st_size)}); the limit is {_size(max_bytes)}.")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:  # reading one byte past the limit catches a file that grew since fstat
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise UserError(f"Cannot read image {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise UserError(f"Image {path} is too big; the limit is {_size(max_bytes)}.")
    return b"".join(chunks)


async def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from bots.commands import build_request
    from bots.images import ImageRejected, load_image
    from bots.texts import DEMO_NOTE, progress_bar
    from generator.request import RequestError
    from generator.scheduler.api import DeliveryTarget, JobEvent, Refusal
    from generator.scheduler.service import Scheduler

    prompt = " ".join(args.prompt)
    mode = args.mode or ("i2v" if args.image else "t2v")
    if args.extend is not None and (args.image or _request_options(args)):
        raise UserError("--extend takes only a prompt: the rest comes from the job it continues.")
    if args.extend is None and not prompt.strip():
        raise UserError("Please give a prompt (or --extend JOB to continue a video).")
    if args.extend is None and mode == "i2v" and not args.image:
        raise UserError("Image-to-video needs --image PATH.")
    image_bytes: bytes | None = None
    if args.image:
        image_bytes = _read_image_file(args.image, settings.limits.max_image_bytes)
        try:
            validated = load_image(image_bytes, settings.limits)
        except ImageRejected as exc:
            raise UserError(exc.message) from None
    try:  # validate before starting anything heavy
        if args.extend is None:
            build_request(
                settings, mode, prompt, image="0" * 64 if args.image else None, options=_request_options(args)
            )
    except RequestError as exc:
        raise UserError(exc.message) from None

    db = await _open_database(settings)
    scheduler = Scheduler(settings, db=db)
    requester = _local_requester()
    printer = _ProgressPrinter(enabled=not args.no_progress and not args.json)
    job_id: int | None = None

    def worker_loading() -> bool:
        return scheduler.views.workers_loading()

    def waiting(job_id: int, position: int | None) -> str:
        # Loading the engine takes many seconds (torch import, weights): say so instead of going silent.
        where = f"queued (#{position})" if position else "queued"
        if worker_loading():
            return f"job #{job_id}: {where}; starting the GPU worker and loading the model…"
        return f"job #{job_id}: {where}"

    async def show_progress(event: JobEvent) -> None:
        # Display only (and it marks CLI jobs delivered): completion is awaited with scheduler.views.wait().
        job = event.job
        if job.id != job_id:
            return
        if event.kind == "queued" and job.position:
            printer.show(waiting(job.id, job.position))
        elif event.kind in ("started", "progress"):
            printer.show(f"job #{job.id}: {_phase_progress(job, progress_bar)}")

    try:
        await scheduler.start(run_workers=True)
        try:
            image_ref = None
            if args.image:  # may be refused (storage_unavailable) like the submit below
                image_ref = await scheduler.jobs.save_input(requester, validated.png_bytes, validated.width, validated.height)
            if args.extend is not None:
                result = await scheduler.jobs.extend(
                    args.extend, requester, DeliveryTarget(platform="cli"), f"cli:{uuid.uuid4()}",
                    prompt=prompt.strip() or None,
                )
            else:
                request = build_request(settings, mode, prompt, image=image_ref, options=_request_options(args))
                result = await scheduler.jobs.submit(
                    request, requester, DeliveryTarget(platform="cli"), f"cli:{uuid.uuid4()}"
                )
            job_id = result.job.id
            printer.show(f"job #{job_id}: submitted, seed {result.job.seed}")
            if worker_loading():
                printer.show(waiting(job_id, result.job.position))
            scheduler.subscribe("cli", show_progress)
            job = await scheduler.views.wait(job_id, stop_on_worker_error=True)
        except Refusal as exc:
            raise UserError(exc.message) from None
    finally:
        printer.done()
        await scheduler.stop()
        await db.dispose()

    if job.state != "succeeded" or job.output is None:
        reason = job.error_message or job.state
        raise UserError(f"Job #{job.id} {job.state}: {reason}")
    path = Path(job.output.path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
    info = {
        "job_id": job.id,
        "seed": job.seed,
        "output": str(path),
        "copied_to": str(args.out) if args.out else None,
        "model": job.output.model_label,
        "demo_model": job.output.is_demo,
        "width": job.output.width,
        "height": job.output.height,
        "frames": job.output.frames,
        "bytes": job.output.bytes,
        "seconds": job.timings.get("total"),
        "prompt": job.request.prompt,
        "original_prompt": job.request.original_prompt,  # set when prompt expansion rewrote the prompt
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"job {job.id} succeeded")
        print(f"seed: {job.seed}")
        if job.request.original_prompt:
            print(f"prompt (expanded): {job.request.prompt}")
        print(f"output: {path}")
        if args.out:
            print(f"copied to: {args.out}")
        print(f"model: {job.output.model_label} · {job.output.width}x{job.output.height} · {job.output.frames} frames")
        if job.output.is_demo:
            print(f"note: {DEMO_NOTE}")
    return 0


async def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from generator.scheduler.service import Scheduler

    db = await _open_database(settings)
    try:
        views = await Scheduler(settings, db=db).listings.jobs(limit=max(1, args.limit))
        data: list[dict[str, Any]] = [
            {"id": v.id, "state": v.state, "mode": v.request.mode, "seed": v.request.seed, "model": v.request.model,
             "platform": v.target.platform, "created": v.created_at.isoformat(timespec="seconds"),
             "prompt": v.request.prompt}
            for v in views
        ]
    finally:
        await db.dispose()
    if args.json:
        print(json.dumps(data))
        return 0
    if not data:
        print("No jobs yet. Try: turbobot generate \"a red fox running through snow\"")
        return 0
    _print_table(
        [("id", ">"), ("state", "<"), ("mode", "<"), ("seed", ">"), ("model", "<"), ("created", "<"), ("prompt", "<")],
        [
            [str(d["id"]), d["state"], d["mode"], str(d["seed"]), d["model"], _local_time(d["created"]),
             d["prompt"] if len(d["prompt"]) <= 50 else d["prompt"][:49] + "…"]
            for d in data
        ],
    )
    return 0


async def cmd_ready(settings: Settings, args: argparse.Namespace) -> int:
    """The readiness /readyz answers (the same function), for scripts and operators without the console."""
    from generator.scheduler.service import Scheduler

    db = await _open_database(settings)
    try:
        result = await Scheduler(settings, db=db).views.readiness()
    finally:
        await db.dispose()
    if args.json:
        print(json.dumps(result.detail))
    else:
        d = result.detail
        print("ready" if result.ready else "not ready")
        print(f"database: {d['database']['reason'] if not d['database']['ok'] else 'ok'}")
        print(f"worker: {'ok' if d['worker']['ok'] else d['worker'].get('reason', 'not ready')}")
        print(f"storage: {'ok' if d['storage']['ok'] else d['storage']['reason']}")
    return 0 if result.ready else EXIT_FAILED


def _local_time(iso: str) -> str:
    """The stored UTC timestamp as local wall-clock time, the way people read it in a table."""
    import datetime as dt

    when = dt.datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_table(columns: list[tuple[str, str]], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell, so headers and values line up whatever the data."""
    widths = [max([len(name), *(len(r[i]) for r in rows)]) for i, (name, _) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        parts = [f"{c:{align}{w}}" for c, (_, align), w in zip(cells, columns, widths, strict=True)]
        parts[-1] = cells[-1]  # the last column is not padded (no trailing spaces)
        return "  ".join(parts)

    print(line([name for name, _ in columns]))
    for r in rows:
        print(line(r))


def _check_listen(host: str, port: int) -> None:
    """Bind (and release) every address the console would listen on; UserError saying why one fails."""
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(
            f"Cannot serve the web console on {where}: the host {host!r} does not resolve ({exc.strerror}). "
            "Set [web] host in config.toml (127.0.0.1 for this machine only)."
        ) from None
    with contextlib.ExitStack() as stack:
        for family, kind, proto, _, addr in infos:
            sock = stack.enter_context(socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    why = (f"port {port} is already in use (another turbobot or another program is listening). "
                           "Stop it, or set another [web] port in config.toml.")
                elif exc.errno == errno.EADDRNOTAVAIL:
                    why = (f"{host} is not an address of this machine. Set [web] host in config.toml "
                           "(127.0.0.1 for this machine only, 0.0.0.0 for every interface).")
                elif exc.errno == errno.EACCES:
                    why = f"port {port} needs administrator rights. Set [web] port to 1024 or above in config.toml."
                else:
                    why = f"{exc.strerror or exc}."
                raise UserError(f"Cannot serve the web console on {where}: {why}") from None


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from generator.scheduler.service import Scheduler
    from turbobot.logs import protect_secret

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    def enabled(flag: str, token: str | None) -> bool:
        return flag == "yes" or (flag == "auto" and bool(token))

    discord_token = read_secret(settings.discord.token_env)
    telegram_token = read_secret(settings.telegram.token_env)
    protect_secret(discord_token)
    protect_secret(telegram_token)
    for name, flag, token in (("discord", settings.discord.enabled, discord_token),
                              ("telegram", settings.telegram.enabled, telegram_token)):
        if flag == "yes" and not token:
            env = getattr(settings, name).token_env
            raise UserError(f"[{name}] enabled = \"yes\" but ${env} (or ${env}_FILE) is not set.")

    use_discord = enabled(settings.discord.enabled, discord_token)
    use_telegram = enabled(settings.telegram.enabled, telegram_token)
    if not (use_discord or use_telegram or settings.web.enabled):
        print(
            "No front end is enabled. Set DISCORD_TOKEN or TELEGRAM_TOKEN in the environment to start a bot, "
            "or enable the web console ([web] enabled = true in config.toml).",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if settings.web.enabled:
        # Before anything starts (database, GPU worker) or is announced: a console that cannot listen, or
        # must not (public address without an admin token), stops the run here with the reason.
        from bots.web import WebConfigError
        from bots.web.security import load_admin_token

        try:
            load_admin_token(settings)
        except WebConfigError as exc:
            raise UserError(str(exc)) from None
        _check_listen(settings.web.host, settings.web.port)

    db = await _open_database(settings)
    scheduler = Scheduler(settings, db=db)
    await scheduler.start(run_workers=not args.no_workers)
    if args.no_workers:
        log.info("no local GPU workers (--no-workers): jobs wait for `turbobot worker` hosts")
    tasks: list[asyncio.Task[None]] = []
    try:
        if use_discord:
            from bots.discord import run_discord

            tasks.append(asyncio.create_task(run_discord(settings, scheduler, discord_token or "", stop), name="discord"))
        if use_telegram:
            from bots.telegram import run_telegram

            tasks.append(asyncio.create_task(run_telegram(settings, scheduler, telegram_token or "", stop), name="telegram"))
        if settings.web.enabled:
            from bots.web import run_web

            tasks.append(asyncio.create_task(run_web(settings, scheduler, stop), name="web"))
        names = ", ".join(t.get_name() for t in tasks)
        log.info("turbobot running: %s (Ctrl+C to stop)", names)
        if settings.web.enabled:
            print(f"Web console: http://{settings.web.host}:{settings.web.port}/", flush=True)
        if not discord_token and not telegram_token:
            print("No chat bot configured: set DISCORD_TOKEN and/or TELEGRAM_TOKEN to start the bots.", flush=True)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        stopper.cancel()
        await asyncio.wait(tasks, timeout=15)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        for t in failed:
            print(f"turbobot: {t.get_name()} stopped: {t.exception()}", file=sys.stderr)
        return EXIT_FAILED if failed else 0
    finally:
        for t in tasks:
            t.cancel()
        await scheduler.stop()
        await db.dispose()


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """A GPU host: the same scheduler core (supervised workers, heartbeats, leases, fencing, expired-lease
    recovery, graceful hand-back on stop) with no front end. Jobs come from the shared database; inputs
    and outputs go through the configured file store."""
    from generator.scheduler.service import Scheduler

    if args.devices:
        settings = dataclasses.replace(
            settings, scheduler=dataclasses.replace(settings.scheduler, worker_devices=args.devices)
        )
        check_worker_groups(settings.scheduler)  # --devices must still split into gpus_per_job groups
    if settings.store.backend == "local" and settings.database.url.startswith("sqlite"):
        log.info("worker host on a local database and local files: this is a one-machine setup")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    db = await _open_database(settings)
    scheduler = Scheduler(settings, db=db)
    try:
        await scheduler.start(run_workers=True)
        log.info("turbobot worker host %s running: devices %s (Ctrl+C to stop)", socket.gethostname(),
                 ", ".join(settings.scheduler.worker_devices))
        print(f"Worker host {socket.gethostname()}: devices {', '.join(settings.scheduler.worker_devices)}",
              flush=True)
        # A worker that cannot load its engine is retried by the supervisor with a growing delay (logged).
        await stop.wait()
        return 0
    finally:
        await scheduler.stop()
        await db.dispose()


# ---------------------------------------------------------------------------------------------- main
COMMANDS = {
    "db": cmd_db, "generate": cmd_generate, "run": cmd_run, "worker": cmd_worker, "jobs": cmd_jobs,
    "ready": cmd_ready,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from turbobot.logs import setup_logging

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"turbobot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = "DEBUG" if args.verbose else settings.app.log_level
    if args.command == "generate" and not args.verbose and logging.getLevelName(level) < logging.WARNING:
        # The progress bar and the result are generate's output: routine INFO lines, here and in the worker
        # (which gets its level from these settings), would garble the bar. -v shows everything.
        level = "WARNING"
    if level != settings.app.log_level:
        settings = dataclasses.replace(settings, app=dataclasses.replace(settings.app, log_level=level))
    setup_logging(level, settings.app.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    try:
        return asyncio.run(COMMANDS[args.command](settings, args))
    except UserError as exc:
        print(f"turbobot: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:
        print(f"turbobot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"turbobot: interrupted after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
