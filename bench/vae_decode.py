"""Wan2.1 VAE decode on one GPU: stock diffusers (frame by frame) vs the engine's chunked causal decode.

Run on a CUDA machine:  PYTHONPATH=. python bench/vae_decode.py [--out DIR] [--latent 21x60x104]
Random weights at the released Wan2.1 VAE size (diffusers' default config), bf16, 480p x 81 frames by default.
In one run: the stock ``AutoencoderKLWan.decode``; a float32 stock decode with TF32 off (the reference); and
the engine's decode (``vae_chunked.iter_decoded``) at several chunk sizes (``--chunk``: the engine's default
cap), with and without channels-last layout, and with ``cudnn.benchmark``. Each output is compared with the stock bf16 output and the float32 reference;
peak GPU memory above the resident model is recorded beside the planner's estimate. Medians of CUDA-event
timings. Prints a table last, writes DIR/vae_decode.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine.offline import ensure_offline

ensure_offline()

from diffusers import AutoencoderKLWan  # noqa: E402

from generator.engine import vae_chunked  # noqa: E402
from generator.engine.vae import latent_stats  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
CUDA = torch.cuda.is_available()  # off CUDA (``--smoke`` on a laptop) wall clock and no memory figures


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def once_ms(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    _sync()
    t0 = time.perf_counter()
    if not CUDA:
        out = fn()
        return (time.perf_counter() - t0) * 1000, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), out


def timed(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, torch.Tensor]:
    """(median ms over ``reps`` after one warm-up, last output)."""
    out = fn()
    _sync()
    times = []
    for _ in range(reps):
        del out
        ms, out = once_ms(fn)
        times.append(ms)
    return sorted(times)[len(times) // 2], out


def mem_allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def ours(vae: AutoencoderKLWan, z: torch.Tensor, chunk: int | None, cl: bool) -> Callable[[], torch.Tensor]:
    opts = vae_chunked.DecodeOptions(max_chunk=z.shape[2], channels_last=cl)
    return lambda: torch.cat(list(vae_chunked.iter_decoded(vae, z, options=opts, chunk=chunk)), dim=2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--latent", default="21x60x104", help="T x h x w of the latent (480p x 81 frames)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=vae_chunked.DecodeOptions().max_chunk)
    ap.add_argument("--smoke", action="store_true", help="tiny latent, runs on the CPU too (checks the script)")
    args = ap.parse_args()
    global DEV
    if not CUDA:
        DEV = torch.device("cpu")
    if args.smoke:
        args.latent = "4x2x3"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t, h, w = (int(v) for v in args.latent.split("x"))
    card = torch.cuda.get_device_properties(DEV).name if CUDA else "cpu"
    res: dict[str, Any] = {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
                           "cudnn": torch.backends.cudnn.version(), "latent": [t, h, w], "variants": {}}
    print(f"card {card}, torch {torch.__version__}, cudnn {res['cudnn']}, latent {t}x{h}x{w}", flush=True)

    torch.manual_seed(0)
    vae32 = AutoencoderKLWan().to(DEV).eval().requires_grad_(False)
    vae = copy.deepcopy(vae32).to(BF16)
    mean, std = latent_stats(vae, DEV, torch.float32)
    zn = torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(1)).to(DEV)
    z32 = zn * std + mean
    z = z32.to(BF16)

    # float32 reference: stock frame-by-frame decode with TF32 off
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ms, ref32 = once_ms(lambda m=vae32: m.decode(z32).sample)
    res["stock_fp32_no_tf32_ms"] = round(ms, 1)
    torch.backends.cudnn.allow_tf32 = True
    del vae32
    if CUDA:
        torch.cuda.empty_cache()
    print("fp32 reference", res["stock_fp32_no_tf32_ms"], "ms", flush=True)

    base = mem_allocated()
    unit = vae_chunked._unit_bytes(vae, h, w, BF16)
    stock_out: torch.Tensor | None = None

    def record(name: str, fn: Callable[[], torch.Tensor], reps: int, **info: Any) -> None:
        nonlocal stock_out
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ms, out = timed(fn, reps)
        row: dict[str, Any] = {"ms": round(ms, 1), "reps": reps, **info,
                               "peak_gib_above_model": round(((torch.cuda.max_memory_allocated() if CUDA else 0) - base) / 2**30, 2)}
        o = out.float()
        if stock_out is None:
            stock_out = out
        row["max_abs_vs_stock_bf16"] = float((o - stock_out.float()).abs().max())
        row["max_abs_vs_fp32"] = float((o - ref32).abs().max())
        row["mean_abs_vs_fp32"] = float((o - ref32).abs().mean())
        chunk = info.get("chunk")
        if isinstance(chunk, int):
            est = vae_chunked._FIXED_UNITS + vae_chunked._PEAK_UNITS_PER_LATENT_FRAME * min(chunk, t - 1)
            row["planner_estimate_gib"] = round(est * unit / 2**30, 2)
        del out, o
        res["variants"][name] = row
        print(name, row, flush=True)
        (out_dir / "vae_decode.json").write_text(json.dumps(res, indent=2))

    record("stock", lambda: vae.decode(z).sample, args.reps)
    k = args.chunk
    record("ours_k1", ours(vae, z, 1, False), 1, chunk=1, channels_last=False)
    record(f"ours_k{k}", ours(vae, z, k, False), 1, chunk=k, channels_last=False)
    record(f"ours_k{t - 1}", ours(vae, z, t - 1, False), 1, chunk=t - 1, channels_last=False)
    record("ours_k1_cl", ours(vae, z, 1, True), 1, chunk=1, channels_last=True)
    record(f"ours_k{k}_cl", ours(vae, z, k, True), args.reps, chunk=k, channels_last=True)
    record("ours_k10_cl", ours(vae, z, 10, True), 1, chunk=10, channels_last=True)
    record(f"ours_k{t - 1}_cl", ours(vae, z, t - 1, True), args.reps, chunk=t - 1, channels_last=True)
    torch.backends.cudnn.benchmark = True
    record(f"ours_k{k}_cl_cudnn_benchmark", ours(vae, z, k, True), args.reps, chunk=k, channels_last=True,
           cudnn_benchmark=True)
    torch.backends.cudnn.benchmark = False
    free = vae_chunked.free_bytes(DEV) if CUDA else None
    res["planner"] = {"free_gib": round((free or 0) / 2**30, 1),
                      "planned_chunk_default": vae_chunked.plan_chunk(
                          vae, h, w, BF16, max_chunk=vae_chunked.DecodeOptions().max_chunk, free=free)}
    (out_dir / "vae_decode.json").write_text(json.dumps(res, indent=2))

    stock_ms = res["variants"]["stock"]["ms"]
    print(f"\nfloat32 reference (stock, TF32 off): {res['stock_fp32_no_tf32_ms']} ms; planner: {res['planner']}")
    print("| variant | ms | speed-up vs stock | max abs vs stock bf16 | max abs vs fp32 | mean abs vs fp32 | "
          "peak GiB above model | planner estimate GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res["variants"].items():
        print(f"| {name} | {r['ms']} | {stock_ms / r['ms']:.2f}x | {r['max_abs_vs_stock_bf16']:.3g} | "
              f"{r['max_abs_vs_fp32']:.3g} | {r['mean_abs_vs_fp32']:.3g} | {r['peak_gib_above_model']} | "
              f"{r.get('planner_estimate_gib', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
