"""GPU correctness check of the SLA Triton kernels against the float32 torch reference (issue 4 item 3).

Run on a CUDA machine:  python bench/attention_check.py [--out DIR] [--quick]
For each shape: fresh random bf16 q, k, v and a random proj_l; the kernel writes into an output buffer
poisoned with NaN; compared with ``sla_reference`` (float32, same block map) by relative Frobenius error.
Also reports how often our block map (Triton pooling + float64 scores) equals the reference's own.
Exit status 1 if any case is NaN or over its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from generator.attention.block_map import select_blocks
from generator.attention.reference import block_lut, sla_reference
from generator.attention.sla_triton import MAIN_CONFIGS, sla_forward

BOUNDS = {"sla": 1e-2, "sagesla": 3e-2}
# Every launch shape the per-shape tuner may pick, for both variants (relative Frobenius error vs the
# float32 reference, same block map).
VARIANTS = [(variant, cfg) for cfg in MAIN_CONFIGS for variant in ("sla", "sagesla")]

REAL_SHAPES = [  # (name, B, L, H)
    ("1.3B-480p", 1, 32760, 12),
    ("14B-480p", 1, 32760, 40),
    ("14B-720p", 1, 75600, 40),
]
SMALL_SHAPES = [
    ("B2-ragged", 2, 1000, 3),
    ("B3-short", 3, 200, 2),  # N_K = 4: topk 0.1 -> kb = 0 -> dense fallback
    ("exact-multiple", 1, 4096, 4),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out.float() - ref.float()
    return (diff.norm() / ref.float().norm()).item()


def check_case(name: str, b: int, length: int, h: int, topk: float, qk_gain: float, seed: int) -> list[dict]:
    d = 128
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    if qk_gain != 1.0:  # sharper attention than unit-variance noise gives
        q = (q.float() * qk_gain).to(torch.bfloat16)
    proj = torch.nn.Linear(d, d, device="cuda")
    with torch.no_grad():
        proj.weight.normal_(0.0, 0.3, generator=gen)
        proj.bias.normal_(0.0, 0.1, generator=gen)

    lut, _ = select_blocks(q, k, topk)
    ref_lut = block_lut(q, k, topk)
    agree = (lut.long() == ref_lut).float().mean().item()
    t0 = time.perf_counter()
    ref = sla_reference(q, k, v, proj, topk=topk, lut=lut)
    torch.cuda.synchronize()
    ref_s = time.perf_counter() - t0
    rows = []
    for variant, cfg in VARIANTS:
        out = torch.full_like(q, float("nan"))
        sla_forward(q, k, v, proj, topk=topk, int8_qk=(variant == "sagesla"), out=out, config=cfg)
        torch.cuda.synchronize()
        nans = int(torch.isnan(out).sum().item())
        err = rel_err(out, ref) if nans == 0 else float("nan")
        max_abs = (out.float() - ref.float()).abs().max().item()
        ok = nans == 0 and err < BOUNDS[variant]
        rows.append(
            dict(case=name, B=b, L=length, H=h, topk=topk, qk_gain=qk_gain, variant=variant, config=cfg.name,
                 kb=lut.shape[-1],
                 rel_err=err, max_abs_err=max_abs, nan_count=nans, bound=BOUNDS[variant], ok=ok,
                 block_map_agreement=agree, reference_s=round(ref_s, 2))
        )
        print(f"{name:14s} topk={topk:.2f} gain={qk_gain:.1f} {variant:8s} {cfg.name} kb={lut.shape[-1]:4d} "
              f"rel={err:.2e} max_abs={max_abs:.2e} nan={nans} map_agree={agree:.5f} "
              f"{'OK' if ok else 'FAIL'}", flush=True)
    del q, k, v, ref, lut, ref_lut
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true float32
    torch.backends.cudnn.allow_tf32 = False
    cases = [(n, b, L, h, 0.1, 1.0) for n, b, L, h in SMALL_SHAPES]
    cases.append(("B2-ragged", 2, 1000, 3, 0.5, 2.5))
    if not args.quick:
        cases += [(n, b, L, h, 0.1, 1.0) for n, b, L, h in REAL_SHAPES]
        cases.append(("1.3B-480p", 1, 32760, 12, 0.15, 1.0))
        cases.append(("1.3B-480p", 1, 32760, 12, 0.1, 2.5))
    rows = []
    for i, case in enumerate(cases):
        rows += check_case(*case, seed=1000 + i)
    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention_check.json").write_text(json.dumps(result, indent=1))
    failed = [r for r in rows if not r["ok"]]
    for variant in ("sla", "sagesla"):
        errs = [r["rel_err"] for r in rows if r["variant"] == variant]
        print(f"{variant}: worst rel. error {max(errs):.2e} over {len(errs)} cases (bound {BOUNDS[variant]})")
    agree = min(r["block_map_agreement"] for r in rows)
    print(f"block map vs reference: lowest agreement {agree:.5f}")
    print(f"{device}: {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
