"""Attention timings on one GPU (issue 4 item 4, attention part): SDPA flash, SDPA cuDNN, our sla and
sagesla at topk 0.10 and 0.15, at the three real shapes (B=1, head dim 128, bf16). For a before/after in the
same run, put an older ``sla_triton.py`` beside this file as ``attention_baseline.py`` (e.g. ``git show
d00e945:generator/attention/sla_triton.py``, plus its ``select_blocks``/``k_pass`` of that commit); the
``old_*`` columns are filled only then.

Run on a CUDA machine:  PYTHONPATH=. python bench/attention.py [--out DIR]
Prints a table last and writes everything to DIR/attention.json. Times are medians of
triton.testing.do_bench (CUDA events). The per-shape tuner's own timings of each candidate launch shape
(attention kernel alone) are recorded under "tuning".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from generator.attention import sla_triton
from generator.attention.reference import BK, dense_attention

SHAPES = [("1.3B-480p", 32760, 12), ("14B-480p", 32760, 40), ("14B-720p", 75600, 40)]
TARGETS_MS = {"1.3B-480p": 1.5, "14B-480p": 4.5, "14B-720p": 25.0}


def load_baseline() -> ModuleType | None:
    path = Path(__file__).with_name("attention_baseline.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("attention_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["attention_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def bench(fn: Callable[[], object]) -> float:
    try:
        fn()  # first call: compile and (new kernels) tune, outside the timing
        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    except Exception as exc:  # a backend that cannot run this shape: record, keep going
        print(f"  failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return float("nan")


def bench_shape(name: str, length: int, h: int, base: ModuleType | None) -> dict:
    d = 128
    q, k, v = (torch.randn(1, length, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    proj = torch.nn.Linear(d, d, device="cuda")
    row: dict = dict(shape=name, L=length, H=h)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row["sdpa_flash_ms"] = bench(lambda: dense_attention(q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["sdpa_cudnn_ms"] = bench(lambda: dense_attention(q, k, v))
    for topk in (0.10, 0.15):
        tag = f"{topk:.2f}"
        for variant, int8 in (("sla", False), ("sagesla", True)):
            row[f"{variant}@{tag}_ms"] = bench(
                lambda int8=int8, topk=topk: sla_triton.sla_forward(q, k, v, proj, topk=topk, int8_qk=int8)
            )
            if topk == 0.10 and base is not None:
                row[f"old_{variant}@{tag}_ms"] = bench(
                    lambda int8=int8, topk=topk: base.sla_forward(q, k, v, proj, topk=topk, int8_qk=int8)
                )
    # Breakdown at topk 0.10 (new kernels).
    lut, _ = sla_triton.select_blocks(q, k, 0.10)
    kb = lut.shape[-1]
    row["kb@0.10"] = kb
    row["block_map_ms"] = bench(lambda: sla_triton.select_blocks(q, k, 0.10))
    row["prep_state_ms"] = bench(lambda: sla_triton.prepare(q, k, v, proj.weight, with_state=True))
    prep = sla_triton.prepare(q, k, v, proj.weight, with_state=True)
    row["scores_topk_ms"] = bench(lambda: sla_triton.lut_from_prep(prep, 0.10))
    row["quantize_k_ms"] = bench(lambda: sla_triton.quantize_k(k, prep.k_mean))
    row["sla_sparse_only_ms"] = bench(lambda: sla_triton.sla_forward(q, k, v, None, lut=lut))
    if base is not None:
        old_lut, _ = base.select_blocks(q, k, 0.10, 128, BK)
        row["old_sla_sparse_only_ms"] = bench(lambda: base.sla_forward(q, k, v, None, lut=old_lut))
        row["old_block_map_ms"] = bench(lambda: base.select_blocks(q, k, 0.10, 128, BK))
        row["old_k_pass_state_ms"] = bench(lambda: base.k_pass(k, v, with_state=True))
    flop = 4.0 * h * length * kb * BK * d  # useful work of the sparse branch
    for key in ("sla_sparse_only_ms", "old_sla_sparse_only_ms", "sla@0.10_ms"):
        if key in row:
            row[key.replace("_ms", "_tflops")] = flop / (row[key] * 1e-3) / 1e12
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    base = load_baseline()
    rows: list[dict] = []
    for name, length, h in SHAPES:
        rows.append(bench_shape(name, length, h, base))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), rows=rows, tuning=sla_triton.TUNING_LOG,
                  chosen={str(k): v.name for k, v in sla_triton._TUNED.items()})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention.json").write_text(json.dumps(result, indent=1))
    print("\ntuner (attention kernel alone, ms per candidate):")
    for key, times in sla_triton.TUNING_LOG.items():
        print(f"  {key}: " + ", ".join(f"{n} {t:.3f}" for n, t in times.items()))
    print(f"\n{device}, B=1, D=128, bf16, medians in ms; old = commit d00e945 kernels, same run")
    cols = ["sdpa_flash_ms", "sdpa_cudnn_ms", "old_sla@0.10_ms", "sla@0.10_ms", "old_sagesla@0.10_ms",
            "sagesla@0.10_ms", "sla@0.15_ms", "sagesla@0.15_ms", "sla_sparse_only_ms", "old_sla_sparse_only_ms",
            "prep_state_ms", "block_map_ms", "old_block_map_ms"]
    print(f"{'shape':10s} " + " ".join(f"{c.replace('_ms', ''):>12.12s}" for c in cols))
    for r in rows:
        vals = " ".join(f"{r.get(c, float('nan')):12.3f}" for c in cols)
        print(f"{r['shape']:10s} {vals}   [target <= {TARGETS_MS[r['shape']]} ms]")


if __name__ == "__main__":
    main()
