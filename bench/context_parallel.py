"""Context-parallel (Ulysses) Wan DiT on N GPUs of one host (issue 19 item 3): per-step time and scaling.

Every rank builds the same DiT with random weights at the real size (bf16, our SLA processor), then:
  1. rank 0 alone times the plain single-GPU forward (T1) while the others wait;
  2. all ranks time the context-parallel forward (TN, ``generator.engine.context_parallel``);
  3. with ``--job``: a whole job through ``TurboEngine`` (random umT5-XXL and Wan VAE as bench/engine.py builds
     them; rank 0 renders and decodes, the others ``follow``), prompt to mp4 bytes, timed on rank 0.
Reported: T1, TN, speedup T1/TN and scaling efficiency T1 / (N * TN) per DiT step, job seconds; rank 0 prints a
table and writes DIR/context_parallel_<N>.json. Random weights give honest timings, never quality.

Run on a CUDA host, either
    torchrun --standalone --nproc-per-node 4 bench/context_parallel.py [--model 14B] [--resolution 720p] [--job]
or with our own launcher (spawns one process per GPU, NCCL over 127.0.0.1):
    PYTHONPATH=. python bench/context_parallel.py --nprocs 4 [...]
NVLink multicast (NCCL NVLS) is kept off (NCCL_NVLS_ENABLE=0) unless the environment sets it.
``--smoke`` runs the 2-head tiny model on the CPU with gloo (checks the script, times nothing of interest).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine.offline import ensure_offline

ensure_offline()

from generator.engine.context_parallel import ContextParallel  # noqa: E402
from generator.engine.transformer import build_transformer  # noqa: E402

LATENT = {"480p": (60, 104), "720p": (90, 160)}  # 16:9 latent (h, w) after the VAE's 8x; patch 2x2 follows
KINDS = {"1.3B": "wan2.1-t2v-1.3b", "14B": "wan2.1-t2v-14b"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, reps: int, warm: int) -> float:
    """Median seconds of ``fn()`` after ``warm`` untimed calls (SLA tuning, allocator warm-up)."""
    for _ in range(warm):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model_and_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    if args.smoke:
        from generator.engine import tiny

        config = {**tiny.tiny_transformer_config("tiny-t2v"), "num_attention_heads": 2}
        dtype, lat, frames, text_dim = torch.float32, (8, 14), 3, tiny.TINY_TEXT_DIM
    else:
        from generator.engine.wan_configs import wan_config

        config = wan_config(KINDS[args.model])
        dtype, lat, frames, text_dim = torch.bfloat16, LATENT[args.resolution], 21, int(config["text_dim"])
    torch.manual_seed(0)  # same weights on every rank (same seed, same generator algorithm)
    model = build_transformer(config, attention=args.attention, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, int(config["in_channels"]), frames, *lat, generator=g, device=device,
                                     dtype=dtype),
        "timestep": torch.tensor([900.0], device=device, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 512, text_dim, generator=g, device=device, dtype=dtype),
    }
    return model, inputs


def _job_seconds(args: argparse.Namespace, cp: ContextParallel, device: torch.device, out: Path) -> dict[str, Any]:
    """One whole 81-frame job through the engine (rank 0 renders, the others follow); rank 0's timings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine import random_umt5_xxl, random_vae  # bench/engine.py: random umT5-XXL and Wan VAE on the GPU

    from generator.engine.api import RenderJob
    from generator.engine.options import EngineOptions, ModelOptions
    from generator.engine.runtime import TurboEngine
    from generator.engine.tiny import tiny_tokenizer
    from generator.engine.wan_configs import wan_config
    from generator.request import GenerationRequest

    name = "cp"
    options = EngineOptions(device="cuda", offload="none", compile=False, gpus_per_job=cp.size,
                            models={name: ModelOptions(kind=KINDS[args.model], label=f"{args.model} random")})
    engine = TurboEngine(options, device=device, group=cp.group)
    torch.manual_seed(0)
    dit = build_transformer(wan_config(KINDS[args.model]), attention=args.attention, device=device,
                            dtype=torch.bfloat16)
    engine.adopt(name, experts=[dit], text_encoder=random_umt5_xxl(), tokenizer=tiny_tokenizer(), vae=random_vae())
    results: dict[str, Any] = {}
    for i in range(2):  # the first job warms up (SLA tuning, cuDNN plans); the second is reported
        req = GenerationRequest(mode="t2v", prompt=f"a fox running in snow {i}", model=name, frames=81,
                                resolution=args.resolution, aspect="16:9", seed=10 + i, steps=4,
                                attention=args.attention)
        job = RenderJob(job_id=i, request=req, image_path=None, output_path=out / f"cp_{cp.size}.mp4")
        t0 = time.perf_counter()
        if cp.is_leader:
            res = engine.render(job, progress=lambda _p: None, cancelled=lambda: False)
            results = {"job_s": round(time.perf_counter() - t0, 2),
                       **{k: round(v, 3) for k, v in res.timings.items()}}
        else:
            engine.follow(job)
    return results


def _step_times(model: Any, inputs: dict[str, torch.Tensor], cp: ContextParallel, device: torch.device,
                args: argparse.Namespace) -> dict[str, float]:
    """T1 (rank 0 alone, the plain forward, while the others wait) and TN (the context-parallel forward)."""
    out = {}
    with torch.no_grad():
        if cp.is_leader:
            out["t1_s"] = _time(lambda: model(**inputs, return_dict=False), device, args.reps, args.warm)
        dist.barrier()
        out["tn_s"] = _time(lambda: cp.forward(model, **inputs), device, args.reps, args.warm)
    return out


def run_rank(rank: int, world: int, args: argparse.Namespace) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    if args.smoke:
        backend, device = "gloo", torch.device("cpu")
        torch.set_num_threads(1)
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        backend, device = "nccl", torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=dt.timedelta(minutes=10))
    try:
        cp = ContextParallel()
        model, inputs = _model_and_inputs(args, device)
        cp.check_model(model, args.model)
        out = Path(args.out)
        result: dict[str, Any] = {"world": world, "model": "tiny (smoke)" if args.smoke else args.model,
                                  "resolution": args.resolution, "attention": args.attention,
                                  "torch": torch.__version__, "date": dt.date.today().isoformat()}
        if device.type == "cuda":
            result["card"] = torch.cuda.get_device_name(device)
        result.update(_step_times(model, inputs, cp, device, args))
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.job and not args.smoke:
            result["job"] = _job_seconds(args, cp, device, out)
        if rank == 0:
            t1, tn = result["t1_s"], result["tn_s"]
            result["speedup"] = round(t1 / tn, 3)
            result["efficiency"] = round(t1 / (world * tn), 3)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"context_parallel_{world}.json").write_text(json.dumps(result, indent=2))
            print(f"{result['model']} {args.resolution} {args.attention}: {world} ranks, "
                  f"T1 {t1 * 1000:.1f} ms/step, T{world} {tn * 1000:.1f} ms/step, speedup {result['speedup']}, "
                  f"efficiency {result['efficiency']}" + (f", job {result['job']}" if "job" in result else ""),
                  flush=True)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    run_rank(rank, world, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(KINDS), default="14B")
    p.add_argument("--resolution", choices=sorted(LATENT), default="720p")
    p.add_argument("--attention", choices=("sla", "sagesla", "dense"), default="sla")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--job", action="store_true", help="also time a whole 4-step 81-frame job through the engine")
    p.add_argument("--nprocs", type=int, default=0, help="spawn this many ranks here instead of using torchrun")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU with gloo")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    world = args.nprocs or 2
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(world, port, args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
