"""The engine factory of the worker-group tests: the real ``TurboEngine`` on the CPU, whose "tiny-t2v" model is
the embedded tiny T2V model's configuration with 2 attention heads (the embedded one has 1, which cannot split
over 2 ranks), as in tests/test_context_parallel.py. With ``scheduler.gpus_per_job`` = 2 the engine runs over the
default process group the worker group set up; with 1 it renders alone (the reference).

``$TURBOBOT_TEST_FOLLOW_MARK``: a follower about to follow a job whose prompt has the word "hold" writes its pid
to that file and, if the file did not exist yet, waits there (the leader meanwhile waits for it at the job's
first exchange) until it is killed, for at most 60 s. A later follower finds the file and follows at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from generator.engine import tiny
from generator.engine.api import RenderJob
from generator.engine.runtime import TurboEngine
from generator.scheduler.engine_options import engine_options

MARK_ENV = "TURBOBOT_TEST_FOLLOW_MARK"


def two_head_model() -> torch.nn.Module:
    from generator.engine.transformer import build_transformer

    cfg = {**tiny.tiny_transformer_config("tiny-t2v"), "num_attention_heads": 2, "num_layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return build_transformer(cfg, attention="dense", sla_topk=0.1, device="cpu", dtype=torch.float32)


class GroupTestEngine(TurboEngine):
    def follow(self, job: RenderJob) -> None:
        mark = os.environ.get(MARK_ENV)
        if mark and "hold" in job.request.prompt.split():
            first = not Path(mark).exists()
            Path(mark).write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while first and time.monotonic() < deadline:
                time.sleep(0.005)
        super().follow(job)


def make_engine(settings: Any) -> GroupTestEngine:
    torch.set_num_threads(1)  # the ranks share a 2-core machine
    options = engine_options(settings)
    options = dataclasses.replace(options, device="cpu", models={"tiny-t2v": options.models["tiny-t2v"]},
                                  i2v_model="")
    eng = GroupTestEngine(options)  # with gpus_per_job > 1: over the default process group
    eng.adopt("tiny-t2v", experts=[two_head_model()], text_encoder=tiny.tiny_text_encoder(),
              tokenizer=tiny.tiny_tokenizer(), vae=tiny.tiny_vae(), is_demo=True)
    return eng
