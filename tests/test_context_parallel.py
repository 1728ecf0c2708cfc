"""Ulysses context parallelism (generator/engine/context_parallel.py) on the CPU: two real processes with the
gloo backend run the Wan DiT forward (dense and SLA attention) and a 2-step rCM sample context-parallel, and
must match the single-process result.

The model is the embedded tiny T2V model's configuration with 2 heads and 2 blocks (the embedded model itself
has 1 head, which cannot split over 2 ranks; that refusal is tested too). Tolerance, float32 on the CPU: the
all-to-alls and the all-gather only move bytes, so the only differences come from matmuls and reductions
blocked differently over S = L/2 tokens instead of L (each output a sum of at most 64 products, relative
rounding ~ 64 * 2^-24 ~ 4e-6 at worst, typically ~1e-7); through 2 blocks and 2 sampler steps we allow
2e-5 of the output's scale. Both ranks must hold bit-identical results (they are gathered copies of one
set of shards), which is what keeps the sampler's state in step on every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from generator.engine import rcm, tiny
from generator.engine.api import EngineError

WORLD = 2
SHAPES = {"odd": (3, 7, 31), "even": (2, 4, 6)}  # latent (frames, h, w): 651 tokens (padded shard), 48
TOL = 2e-5


def _model(attention: str) -> torch.nn.Module:
    from generator.engine.transformer import build_transformer

    cfg = {**tiny.tiny_transformer_config("tiny-t2v"), "num_attention_heads": 2, "num_layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return build_transformer(cfg, attention=attention, sla_topk=0.1, device="cpu", dtype=torch.float32)


def _inputs(shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "hidden_states": torch.randn(1, 16, *shape, generator=g),
        "timestep": rcm.timestep_tensor(0.9, 1, torch.device("cpu")),
        "encoder_hidden_states": torch.randn(1, 9, tiny.TINY_TEXT_DIM, generator=g),
    }


def _sample(forward: Any, emb: torch.Tensor) -> torch.Tensor:
    """A 2-step rCM SDE sample of the (2, 4, 6) latent with ``forward(x, timestep, emb)``."""
    return rcm.sample(lambda x, t, _e: forward(x, t, emb), (1, 16, *SHAPES["even"]),
                      t_steps=rcm.rf_times(2, 80.0), generator=torch.Generator().manual_seed(5),
                      dtype=torch.float32, sde=True)


def _cases(run: Any) -> dict[str, torch.Tensor]:
    """Every result the test compares, computed with ``run(model, **inputs)`` as the forward."""
    out = {}
    with torch.no_grad():
        for attention in ("dense", "sla"):
            model = _model(attention)
            for name, shape in SHAPES.items():
                out[f"{attention}-{name}"] = run(model, **_inputs(shape))
        emb = _inputs(SHAPES["even"])["encoder_hidden_states"]
        out["rcm"] = _sample(lambda x, t, e: run(model, hidden_states=x, timestep=t, encoder_hidden_states=e),
                             emb)
    return out


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from generator.engine.context_parallel import ContextParallel

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        cp = ContextParallel()
        results: dict[str, Any] = dict(_cases(cp.forward))
        try:  # the embedded tiny model has 1 head: refused with a clear message
            cp.check_model(tiny.tiny_transformers("tiny-t2v", attention="dense")[0], "tiny-t2v")
            results["refusal"] = ""
        except EngineError as exc:
            results["refusal"] = exc.user_message
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_context_parallel_matches_single_process(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")  # the children inherit torch and diffusers already imported: fast start
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "rendezvous"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _cases(lambda model, **kw: model(**kw, return_dict=False)[0])
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            assert p.pid is not None
            os.kill(p.pid, 9)
            pytest.fail("a context-parallel rank did not finish in time")
    assert [p.exitcode for p in procs] == [0] * WORLD

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert "1 attention heads" in ranks[0]["refusal"] and "gpus_per_job" in ranks[0]["refusal"]
    for name, ref in reference.items():
        for r, res in enumerate(ranks):
            got = res[name]
            assert got.shape == ref.shape, name
            scale = float(ref.abs().max())
            err = float((got.double() - ref.double()).abs().max())
            assert err <= TOL * max(scale, 1.0), f"{name} rank {r}: max |diff| {err:.2e} (scale {scale:.2f})"
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0)  # same gathered bytes


# --- the engine: a job rendered by a leader and a follower ------------------------------------------------


def _engine(group: Any = None, gpus: int = 1) -> Any:
    """A CPU engine whose "tiny-t2v" model is the 2-head variant (adopted, with the tiny text encoder/VAE)."""
    from generator.engine.options import EngineOptions
    from generator.engine.runtime import TurboEngine

    eng = TurboEngine(EngineOptions(device="cpu", gpus_per_job=gpus), group=group)
    eng.adopt("tiny-t2v", experts=[_model("dense")], text_encoder=tiny.tiny_text_encoder(),
              tokenizer=tiny.tiny_tokenizer(), vae=tiny.tiny_vae(), is_demo=True)
    return eng


def _job(out: Path, seed: int = 3) -> Any:
    from generator.engine.api import RenderJob
    from generator.request import GenerationRequest

    req = GenerationRequest(mode="t2v", prompt="a lighthouse at dusk", model="tiny-t2v", frames=5, seed=seed,
                            steps=2)
    return RenderJob(job_id=1, request=req, image_path=None, output_path=out)


def _engine_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from generator.engine.api import JobCancelled

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    out = Path(out_dir)
    try:
        eng = _engine(group=None, gpus=WORLD)  # the default group
        notes = []
        if rank == 0:
            res = eng.render(_job(out / "cp.mp4"), progress=lambda _p: None, cancelled=lambda: False)
            notes.append(f"rendered {res.frames}")
        else:
            eng.follow(_job(out / "unused.mp4"))
            notes.append("followed")
        # The leader cancels after its first denoise step: every rank stops at the same check.
        steps: list[int] = []
        try:
            if rank == 0:
                eng.render(_job(out / "cancelled.mp4", seed=4), cancelled=lambda: len(steps) >= 1,
                           progress=lambda p: steps.append(p.step) if p.stage == "denoise" and p.step else None)
            else:
                eng.follow(_job(out / "unused.mp4", seed=4))
            notes.append("not cancelled")
        except JobCancelled:
            notes.append("cancelled")
        try:  # the embedded 1-head model is refused when the group loads it
            eng._bundles.clear()
            eng.load()
            notes.append("loaded 1-head model")
        except EngineError as exc:
            notes.append(exc.code)
        (out / f"notes{rank}.txt").write_text("\n".join(notes))
    finally:
        dist.destroy_process_group()


def test_engine_job_over_two_ranks_matches_one(tmp_path: Path) -> None:
    from generator import media

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_engine_rank, args=(r, str(tmp_path / "rendezvous"), str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _engine()
        single.render(_job(tmp_path / "single.mp4"), progress=lambda _p: None, cancelled=lambda: False)
        with pytest.raises(EngineError, match="gpus_per_job = 2 needs the worker to run as a group"):
            _engine(gpus=2)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            assert p.pid is not None
            os.kill(p.pid, 9)
            pytest.fail("a context-parallel rank did not finish in time")
    assert [p.exitcode for p in procs] == [0] * WORLD

    assert (tmp_path / "notes0.txt").read_text().split("\n") == [
        "rendered 5", "cancelled", "context_parallel_unsupported"]
    assert (tmp_path / "notes1.txt").read_text().split("\n") == [
        "followed", "cancelled", "context_parallel_unsupported"]
    assert not (tmp_path / "unused.mp4").exists() and not (tmp_path / "cancelled.mp4").exists()
    a = media.decode_frames(tmp_path / "single.mp4").astype(np.int16)
    b = media.decode_frames(tmp_path / "cp.mp4").astype(np.int16)
    assert a.shape == b.shape
    # Latents agree to ~1e-7 (see above); after uint8 rounding and H.264 a pixel may differ by a level or two.
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()
