"""A follower rank of a worker group: ``python -m generator.scheduler.follower --worker-id ID --group SPEC``.

Started by the supervisor beside the group's leader (the ordinary worker process, rank 0) when
``scheduler.gpus_per_job`` > 1; see ``generator.scheduler.group``. It never touches the database or the files:
it joins the group, loads the same engine as the leader, then takes each job the leader announces and runs its
part of it (``engine.follow``: the context-parallel denoise steps, cancelled when the leader cancels).

stdin: the settings line, then nothing; EOF means the supervisor is gone or ends the group: exit at once.
stdout is not used (re-pointed to stderr). Exit codes: 4 when the engine cannot be loaded, 1 on any error that
may leave the ranks out of step (the supervisor then ends and restarts the whole group; the leader's lease
requeues its job). A refusal every rank meets alike (``EngineError`` before the first exchange) and a cancel
are not errors: the follower waits for the next job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import traceback
from typing import Any

from generator.engine.api import EngineError, JobCancelled, OutOfMemory
from generator.scheduler.group import GroupLink, GroupSpec
from generator.scheduler.worker import EXIT_LOAD_FAILED, decode_settings, factory_spec, load_factory
from turbobot.logs import setup_logging

log = logging.getLogger("turbobot.follower")


def _exit_on_eof() -> None:
    for _line in sys.stdin:
        pass
    os._exit(0)


def serve(engine: Any, link: GroupLink) -> None:
    """Follow the leader's jobs until an error that may break the group (raised) or the process ends."""
    while True:
        job = link.next_job()
        try:
            engine.follow(job)
        except JobCancelled:
            log.info("rank %s: job %s cancelled by the leader", link.spec.rank, job.job_id)
        except OutOfMemory:
            raise  # maybe on this rank only: the ranks are out of step now
        except EngineError as exc:
            log.info("rank %s: job %s refused: %s", link.spec.rank, job.job_id, exc.user_message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator.scheduler.follower")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--group", required=True, help="rank,size,port,backend (from the supervisor)")
    args = parser.parse_args(argv)
    spec = GroupSpec.parse(args.group)

    os.dup2(2, 1)
    sys.stdout = sys.stderr
    settings = decode_settings(sys.stdin.readline())
    setup_logging(settings.app.log_level, settings.app.log_format, sys.stderr,
                  process=f"follower[{args.worker_id} rank {spec.rank}]")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    threading.Thread(target=_exit_on_eof, daemon=True, name="stdin").start()

    link = GroupLink.join(spec, timeout_s=settings.scheduler.worker_start_timeout_seconds)
    try:
        engine = load_factory(factory_spec())(settings)
        engine.load()
        warm_up = getattr(engine, "warm_up", None)
        if warm_up is not None:
            warm_up()  # the leader warms up too: compiled forwards exchange over the group
    except Exception:
        log.error("rank %s: the engine could not be loaded:\n%s", spec.rank, traceback.format_exc())
        sys.stderr.flush()
        os._exit(EXIT_LOAD_FAILED)
    try:
        serve(engine, link)
    except Exception:
        log.error("rank %s: leaving the group:\n%s", spec.rank, traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
