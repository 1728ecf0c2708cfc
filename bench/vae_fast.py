"""Wan2.1 VAE decode with the fast block forwards (generator/engine/vae_fast.py) vs today's chunked decode and
stock diffusers, on one GPU, in one run.

Run on a CUDA machine:  PYTHONPATH=. python bench/vae_fast.py [--out DIR] [--reps 3] [--no-720p]
Random weights at the released Wan2.1 VAE size, bf16. For 480p (and 720p) x 81 frames: stock
``AutoencoderKLWan.decode``; the engine's chunked decode (k latent frames per pass) with the stock blocks; the same
with the fast blocks. Medians of CUDA-event timings after a warm-up. At 480p both bf16 decodes are compared with
a float32 decode (TF32 off) to show the fast one is as close to it as stock. A profile of the fast decode lists
the top kernels. Writes DIR/vae_fast.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine.offline import ensure_offline

ensure_offline()

from diffusers import AutoencoderKLWan  # noqa: E402

from generator.engine import vae_chunked  # noqa: E402

DEV = torch.device("cuda")


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), out


def chunked(vae: AutoencoderKLWan, z: torch.Tensor, k: int, fast: bool) -> Callable[[], torch.Tensor]:
    opts = vae_chunked.DecodeOptions(max_chunk=k, adaptive=False, fast_blocks=fast)

    def run() -> torch.Tensor:
        return torch.cat(list(vae_chunked.iter_decoded(vae, z, options=opts)), dim=2)

    return run


def stock(vae: AutoencoderKLWan, z: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(z).sample.clamp_(-1, 1)

    return run


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).abs()
    return {"max": round(d.max().item(), 5), "mean": round(d.mean().item(), 6)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", default="3,5")
    ap.add_argument("--no-720p", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-stock", action="store_true", help="skip diffusers' own decode (the slowest case)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=96, z_dim=16).to(DEV, torch.bfloat16).eval().requires_grad_(False)
    sizes = {"480p": (60, 104)} if args.no_720p else {"480p": (60, 104), "720p": (90, 160)}
    chunks = [int(c) for c in args.chunks.split(",")]
    report: dict[str, Any] = {"card": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
                              "torch": torch.__version__, "results": {}}
    for label, (h, w) in sizes.items():
        z = torch.randn(1, 16, 21, h, w, device=DEV, generator=torch.Generator(DEV).manual_seed(1)).bfloat16()
        cases: dict[str, Callable[[], torch.Tensor]] = {} if args.no_stock else {"stock diffusers": stock(vae, z)}
        for k in chunks:
            cases[f"chunked k{k}"] = chunked(vae, z, k, False)
            cases[f"chunked k{k} + fast blocks"] = chunked(vae, z, k, True)
        res: dict[str, Any] = {}
        outs: dict[str, torch.Tensor] = {}
        for name, fn in cases.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _, out = timed(fn)  # warm-up (cuDNN autotune, Triton compile)
            times = []
            for _ in range(args.reps):
                ms, out = timed(fn)
                times.append(ms)
            res[name] = {"ms_median": round(statistics.median(times), 1), "ms_all": [round(t, 1) for t in times],
                         "peak_gib_above_model": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
            outs[name] = out.to("cpu", torch.float16)
            del out
            torch.cuda.empty_cache()
            print(label, name, res[name], flush=True)
        ref_name = f"chunked k{chunks[0]}"
        for name in outs:
            res[name]["vs_" + ref_name] = diff(outs[name], outs[ref_name])
        if label == "480p" and not args.no_reference:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            vae32 = AutoencoderKLWan(base_dim=96, z_dim=16).eval().requires_grad_(False)
            vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
            vae32 = vae32.to(DEV)
            ref = stock(vae32, z.float())().to("cpu")
            del vae32
            torch.cuda.empty_cache()
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            for name in outs:
                res[name]["vs_float32"] = diff(outs[name], ref)
            del ref
        if label == "480p":
            from torch.profiler import ProfilerActivity, profile

            fn = cases[f"chunked k{chunks[0]} + fast blocks"]
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            rows = []
            for ev in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:15]:
                rows.append({"kernel": ev.key[:90], "ms": round(ev.self_device_time_total / 1000, 1), "calls": ev.count})
            res["profile_fast_top_kernels"] = rows
            for r in rows:
                print("  ", r, flush=True)
        report["results"][label] = res
        del outs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_fast.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["results"], indent=1))


if __name__ == "__main__":
    main()
