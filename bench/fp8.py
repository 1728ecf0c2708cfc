"""fp8 linears on one GPU (issue 14 items 2 and 5): accuracy against bf16 and DiT step times, side by side.

Run on a CUDA machine with fp8 tensor cores:  PYTHONPATH=. python bench/fp8.py [--out DIR] [--skip-14b]
                                               [--no-compile]
1. GEMM check: ``Fp8Linear`` through ``torch._scaled_mm`` against the float64 product of the same quantized
   operands (what the CPU tests check the quantization against), at the Wan shapes.
2. GEMM speed at the Wan shapes: bf16 ``F.linear`` vs ``Fp8Linear`` (activation quantization included).
3. Per model (1.3B at 480p, 14B at 720p; random weights at the real sizes, 81 frames): the same random weights
   in bf16 and in fp8; relative L2 error of each of the ten block linears (inputs captured from the bf16
   forward in three blocks) and of the whole forward; one DiT forward (= one sampling step) in both
   precisions, eager and with regional compile. Peak GPU memory of each.
Random weights give honest timings and error statistics, never quality. Prints a table, writes DIR/fp8.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generator.engine.offline import ensure_offline

ensure_offline()

from engine import BF16, DEV, cuda_ms, gib  # noqa: E402  (bench/engine.py: the same timing helpers)

from generator.engine import fp8  # noqa: E402
from generator.engine.transformer import build_transformer  # noqa: E402
from generator.engine.wan_configs import wan_config  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


GEMMS = [  # (tokens, in, out): 1.3B 480p qkv/o, FFN in/out; 14B 720p qkv/o, FFN in/out
    (32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536),
    (75600, 5120, 5120), (75600, 5120, 13824), (75600, 13824, 5120),
]


def gemm_section() -> list[dict[str, Any]]:
    rows = []
    for m, k, n in GEMMS:
        g = torch.Generator(device=DEV).manual_seed(m + k + n)
        x = torch.randn(m, k, device=DEV, dtype=BF16, generator=g)
        lin = torch.nn.Linear(k, n, device=DEV, dtype=BF16)
        layer = fp8.Fp8Linear.from_linear(lin)
        with torch.no_grad():
            out = layer(x)
            xq, xs = fp8.quantize_rows(x[:4096])
            ref_q = ((xq.double() * xs.double()) @ (layer.weight.double() * layer.weight_scale.double()).t()
                     + layer.bias.double())
            same_operands = rel_l2(out[:4096], ref_q)
            vs_bf16 = rel_l2(out, F.linear(x, lin.weight, lin.bias))
            t_bf = cuda_ms(lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias))
            t_f8 = cuda_ms(lambda x=x, layer=layer: layer(x))
            xq_full, xs_full = fp8.quantize_rows(x)
            t_mm_only = cuda_ms(lambda a=xq_full, sa=xs_full, w=layer: torch._scaled_mm(
                a, w.weight.t(), scale_a=sa, scale_b=w.weight_scale.t(), bias=w.bias, out_dtype=BF16))
        flop = 2 * m * k * n
        row = {"shape": f"{m}x{k}x{n}", "err_vs_same_operands": same_operands, "err_vs_bf16": vs_bf16,
               "bf16_ms": round(t_bf, 3), "fp8_layer_ms": round(t_f8, 3),
               "fp8_gemm_only_ms": round(t_mm_only, 3),
               "bf16_tflops": round(flop / t_bf / 1e9, 0), "fp8_gemm_tflops": round(flop / t_mm_only / 1e9, 0)}
        print("gemm", row, flush=True)
        rows.append(row)
        del x, lin, layer, xq_full, xs_full
        torch.cuda.empty_cache()
    return rows


def model_inputs(cfg: dict[str, Any], lat: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(7)
    return {
        "hidden_states": torch.randn(1, cfg["in_channels"], *lat, device=DEV, dtype=BF16, generator=g),
        "timestep": torch.tensor([900.0], device=DEV, dtype=BF16),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=DEV, dtype=BF16, generator=g),
    }


def forward(model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp, return_dict=False)[0]


def model_section(kind: str, lat: tuple[int, int, int], compile_: bool) -> dict[str, Any]:
    cfg = wan_config(kind)
    inp = model_inputs(cfg, lat)
    res: dict[str, Any] = {"kind": kind, "latent": list(lat)}
    torch.manual_seed(0)
    model = build_transformer(cfg, attention="sla", device=DEV, dtype=BF16)
    res["bf16_weight_gib"] = gib(fp8.weight_bytes(model))

    # Per-layer inputs from the bf16 forward, three blocks.
    picks = sorted({0, len(model.blocks) // 2, len(model.blocks) - 1})
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i in picks:
        for leaf in fp8.BLOCK_LINEARS:
            name = f"blocks.{i}.{leaf}"
            hooks.append(model.get_submodule(name).register_forward_hook(
                lambda _m, args, _out, name=name: captured.__setitem__(name, args[0].detach())))
    ref = forward(model, inp)
    for h in hooks:
        h.remove()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res["bf16_step_ms_eager"] = round(cuda_ms(lambda m=model: forward(m, inp), reps=3), 1)
    res["bf16_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    per_layer: dict[str, float] = {}
    with torch.no_grad():
        for name, x in captured.items():
            lin = model.get_submodule(name)
            per_layer[name] = rel_l2(fp8.Fp8Linear.from_linear(lin)(x), lin(x))
    captured.clear()
    res["per_layer_rel_l2"] = per_layer
    res["per_layer_rel_l2_max"] = max(per_layer.values())
    if compile_:
        t0 = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=False)
        forward(model, inp)
        res["bf16_compile_s"] = round(time.perf_counter() - t0, 1)
        res["bf16_step_ms_compiled"] = round(cuda_ms(lambda m=model: forward(m, inp), reps=3), 1)

    # The same weights in fp8 (converted layer by layer: the bf16 model is not needed afterwards).
    torch._dynamo.reset()
    torch.manual_seed(0)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    model = build_transformer(cfg, attention="sla", device=DEV, dtype=BF16, precision="fp8")
    res["fp8_weight_gib"] = gib(fp8.weight_bytes(model))
    out = forward(model, inp)
    res["whole_forward_rel_l2"] = rel_l2(out, ref)
    del out, ref
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res["fp8_step_ms_eager"] = round(cuda_ms(lambda m=model: forward(m, inp), reps=3), 1)
    res["fp8_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if compile_:
        t0 = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=False)
        forward(model, inp)
        res["fp8_compile_s"] = round(time.perf_counter() - t0, 1)
        res["fp8_step_ms_compiled"] = round(cuda_ms(lambda m=model: forward(m, inp), reps=3), 1)
    print(kind, {k: v for k, v in res.items() if k != "per_layer_rel_l2"}, flush=True)
    del model
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-gemm", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(DEV)
    results: dict[str, Any] = {"card": props.name, "date": dt.date.today().isoformat(), "torch": torch.__version__}
    print(f"card {props.name}, torch {torch.__version__}", flush=True)
    if not args.no_gemm:
        results["gemm"] = gemm_section()
        (out / "fp8.json").write_text(json.dumps(results, indent=2))
    results["models"] = [model_section("wan2.1-t2v-1.3b", (21, 60, 104), not args.no_compile)]
    (out / "fp8.json").write_text(json.dumps(results, indent=2))
    if not args.skip_14b:
        results["models"].append(model_section("wan2.1-t2v-14b", (21, 90, 160), not args.no_compile))
        (out / "fp8.json").write_text(json.dumps(results, indent=2))

    print("\n| GEMM | bf16 ms | fp8 layer ms | fp8 GEMM only ms | bf16 TFLOP/s | fp8 TFLOP/s | err vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for r in results.get("gemm", []):
        print(f"| {r['shape']} | {r['bf16_ms']} | {r['fp8_layer_ms']} | {r['fp8_gemm_only_ms']} | "
              f"{r['bf16_tflops']:.0f} | {r['fp8_gemm_tflops']:.0f} | {r['err_vs_bf16']:.2e} |")
    print("\n| model | step bf16 eager | fp8 eager | bf16 compiled | fp8 compiled | weights bf16/fp8 GiB | "
          "whole fwd rel L2 | worst layer rel L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["models"]:
        print(f"| {r['kind']} | {r['bf16_step_ms_eager']} | {r['fp8_step_ms_eager']} | "
              f"{r.get('bf16_step_ms_compiled', '-')} | {r.get('fp8_step_ms_compiled', '-')} | "
              f"{r['bf16_weight_gib']}/{r['fp8_weight_gib']} | {r['whole_forward_rel_l2']:.2e} | "
              f"{r['per_layer_rel_l2_max']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
