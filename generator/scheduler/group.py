"""A worker group: the processes of one worker that render every job together (``scheduler.gpus_per_job`` > 1).

The supervisor starts rank 0 as the ordinary worker process (it claims, heartbeats, holds the lease, reports
progress, decodes and publishes) and ranks 1..N-1 as followers (``generator.scheduler.follower``). All of them
join one ``torch.distributed`` process group (NCCL on GPUs, gloo on the CPU) through a ``TCPStore`` that rank
0 hosts on ``127.0.0.1:<port>`` (the port chosen by the supervisor). The same store carries each job from the
leader to the followers (``announce`` / ``next_job``, JSON, in order); the engine does the rest: its
context-parallel steps run over the default group and every cancel decision is the leader's
(``TurboEngine.follow``). To the queue the group is one worker: one id, one claim, one lease, one heartbeat.

GPU groups: every rank sees all of its group's GPUs (``CUDA_VISIBLE_DEVICES`` = the group's indices, set by the
supervisor) and uses the one at its rank. One visible GPU per process would keep NCCL from using CUDA IPC
(peer-to-peer over NVLink) between the ranks. If any rank dies the supervisor ends the whole group and starts
it again. Imports torch only when a group is joined. See docs/scheduler.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from generator.engine.api import RenderJob
from generator.request import GenerationRequest

FOLLOWER_POLL_SECONDS = 0.02  # how often an idle follower looks for the leader's next job


@dataclass(frozen=True)
class GroupSpec:
    """One rank's place in its group, as the supervisor passes it on the command line (``--group``)."""

    rank: int
    size: int
    port: int
    backend: str  # "nccl" or "gloo"

    def arg(self) -> str:
        return f"{self.rank},{self.size},{self.port},{self.backend}"

    @classmethod
    def parse(cls, text: str) -> GroupSpec:
        rank, size, port, backend = text.split(",")
        spec = cls(int(rank), int(size), int(port), backend)
        if not (0 <= spec.rank < spec.size and 0 < spec.port < 65536 and backend in ("nccl", "gloo")):
            raise ValueError(f"not a group spec: {text!r}")
        return spec


def backend_for(devices: tuple[str, ...]) -> str:
    """NCCL for a group of CUDA indices, gloo for a group of "cpu" entries (validated in the settings)."""
    return "gloo" if all(d == "cpu" for d in devices) else "nccl"


def job_to_json(job: RenderJob) -> str:
    return json.dumps({
        "job_id": job.job_id, "request": job.request.to_dict(),
        "image_path": str(job.image_path) if job.image_path is not None else None,
        "output_path": str(job.output_path), "decoder": job.decoder, "preview_interval_s": job.preview_interval_s,
    })


def job_from_json(text: str | bytes) -> RenderJob:
    data = json.loads(text)
    return RenderJob(
        job_id=int(data["job_id"]), request=GenerationRequest.from_stored(data["request"]),
        image_path=Path(data["image_path"]) if data["image_path"] else None, output_path=Path(data["output_path"]),
        decoder=data["decoder"], preview_interval_s=data["preview_interval_s"],
    )


class GroupLink:
    """This process's membership of its group: the default process group and the store jobs travel by."""

    def __init__(self, spec: GroupSpec, store: Any) -> None:
        self.spec = spec
        self.store = store
        self.seq = 0  # jobs announced (leader) or taken (follower) so far

    @classmethod
    def join(cls, spec: GroupSpec, *, timeout_s: float) -> GroupLink:
        """Rendezvous with the other ranks (waits up to ``timeout_s`` for all of them) and set up the default
        process group; on GPUs this rank's device becomes the current one first."""
        import torch
        import torch.distributed as dist

        if spec.backend == "nccl":
            torch.cuda.set_device(spec.rank)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", spec.port, spec.size, is_master=spec.rank == 0, timeout=timeout,
                              wait_for_workers=True)
        dist.init_process_group(spec.backend, store=dist.PrefixStore("pg", store), rank=spec.rank,
                                world_size=spec.size, timeout=timeout)
        return cls(spec, store)

    @property
    def is_leader(self) -> bool:
        return self.spec.rank == 0

    def announce(self, job: RenderJob) -> None:
        """Leader: the followers start ``job`` now (called just before the leader renders it)."""
        self.seq += 1
        # Previews are the leader's (its progress callback): the followers skip making them.
        self.store.set(f"job/{self.seq}", job_to_json(dataclasses.replace(job, preview_interval_s=None)))

    def next_job(self) -> RenderJob:
        """Follower: wait for the leader's next job. Raises when the leader (the store's host) is gone."""
        key = f"job/{self.seq + 1}"
        while not self.store.check([key]):
            time.sleep(FOLLOWER_POLL_SECONDS)
        data = self.store.get(key)
        self.seq += 1
        if self.store.add(f"read/{self.seq}", 1) == self.spec.size - 1:  # the last follower to read it
            self.store.delete_key(key)
            self.store.delete_key(f"read/{self.seq}")
        return job_from_json(data)
