"""Attention timings on one GPU (issue 4 item 4, attention part): SDPA flash, SDPA cuDNN, our sla and
sagesla at topk 0.10 and 0.15, at the three real shapes (B=1, head dim 128, bf16).

Run on a CUDA machine:  python bench/attention.py [--out DIR] [--sweep]
``--sweep`` also times the main kernel over a few (num_warps, num_stages) choices. Prints a table last and
writes everything to DIR/attention.json. Times are medians of triton.testing.do_bench (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from generator.attention.block_map import select_blocks
from generator.attention.reference import BK, BQ, dense_attention
from generator.attention.sla_triton import k_pass, quantize_k, sla_forward

SHAPES = [("1.3B-480p", 32760, 12), ("14B-480p", 32760, 40), ("14B-720p", 75600, 40)]
TARGETS_MS = {"1.3B-480p": 1.5, "14B-480p": 4.5, "14B-720p": 25.0}
SWEEP = [(8, 2, 1), (8, 2, 2), (8, 3, 2), (4, 2, 2)]  # (num_warps, num_stages, pair)


def bench(fn: Callable[[], object]) -> float:
    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    except Exception as exc:  # a backend that cannot run this shape: record, keep going
        print(f"  failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return float("nan")


def bench_shape(name: str, length: int, h: int, sweep: bool) -> dict:
    d = 128
    q, k, v = (torch.randn(1, length, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    proj = torch.nn.Linear(d, d, device="cuda")
    row: dict = dict(shape=name, L=length, H=h)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row["sdpa_flash_ms"] = bench(lambda: dense_attention(q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["sdpa_cudnn_ms"] = bench(lambda: dense_attention(q, k, v))
    for topk in (0.10, 0.15):
        lut, k_mean = select_blocks(q, k, topk, BQ, BK)
        tag = f"{topk:.2f}"
        row[f"kb@{tag}"] = lut.shape[-1]
        for variant, int8 in (("sla", False), ("sagesla", True)):
            row[f"{variant}@{tag}_ms"] = bench(
                lambda int8=int8, topk=topk: sla_forward(q, k, v, proj, topk=topk, int8_qk=int8)
            )
        # Sparse branch alone (given block map, no linear branch): the part that scales with topk.
        row[f"sla@{tag}_sparse_only_ms"] = bench(lambda lut=lut: sla_forward(q, k, v, None, lut=lut))
        if topk == 0.10:
            row["block_map_ms"] = bench(lambda topk=topk: select_blocks(q, k, topk, BQ, BK))
            row["k_pass_state_ms"] = bench(lambda: k_pass(k, v, with_state=True))
            row["quantize_k_ms"] = bench(lambda k_mean=k_mean: quantize_k(k, k_mean))
            if sweep:
                for nw, ns, pair in SWEEP:
                    row[f"sweep_sla_w{nw}_s{ns}_p{pair}_ms"] = bench(
                        lambda lut=lut, nw=nw, ns=ns, pair=pair: sla_forward(
                            q, k, v, proj, lut=lut, num_warps=nw, num_stages=ns, pair=pair)
                    )
                    row[f"sweep_sagesla_w{nw}_s{ns}_p{pair}_ms"] = bench(
                        lambda lut=lut, nw=nw, ns=ns, pair=pair: sla_forward(
                            q, k, v, proj, lut=lut, int8_qk=True, num_warps=nw, num_stages=ns, pair=pair)
                    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    rows: list[dict] = []
    for name, length, h in SHAPES:
        rows.append(bench_shape(name, length, h, args.sweep))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention.json").write_text(json.dumps(result, indent=1))
    print(f"\n{device}, B=1, D=128, bf16, medians in ms (target at topk 0.10 in brackets)")
    cols = ["sdpa_flash_ms", "sdpa_cudnn_ms", "sla@0.10_ms", "sagesla@0.10_ms", "sla@0.15_ms", "sagesla@0.15_ms",
            "block_map_ms", "k_pass_state_ms"]
    print(f"{'shape':12s} " + " ".join(f"{c.replace('_ms', ''):>15s}" for c in cols))
    for r in rows:
        vals = " ".join(f"{r.get(c, float('nan')):15.3f}" for c in cols)
        print(f"{r['shape']:12s} {vals}   [<= {TARGETS_MS[r['shape']]} ms]")


if __name__ == "__main__":
    main()
