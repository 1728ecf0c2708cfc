"""One full Wan DiT forward per model and self-attention (issue 4 item 4, DiT part), on one GPU.

The measured path is the engine's: ``generator.engine.transformer.build_transformer`` (diffusers
``WanTransformer3DModel``, random weights at the real sizes, bf16, our self-attention processor), batch 1,
81 frames (21 latent frames), 512 text tokens. Self-attention variants: SDPA flash and SDPA cuDNN (dense,
``sdpa_kernel`` pins the backend for self- and cross-attention), our ``sla`` and ``sagesla`` at topk 0.1.
Then the 1.3B 480p forward again with regional ``torch.compile`` of the blocks (each block compiled; the
Triton attention runs between the compiled pieces).

Run on a CUDA machine (diffusers must be importable):
    PYTHONPATH=. python bench/dit_forward.py [--out DIR] [--models 1.3B-480p,14B-480p,14B-720p]
``--smoke`` runs a tiny model on the CPU (checks the script, times nothing of interest).
Times are medians of CUDA-event timings of whole forwards after warm-up forwards (which include Triton
compilation and the attention tuner); peak memory is torch's max allocated during the timed forwards.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch._dynamo
from torch.nn.attention import SDPBackend, sdpa_kernel

from generator.engine.transformer import build_transformer, set_attention
from generator.engine.wan_configs import wan_config

# name -> (config, latent frames x height x width); tokens = 21 x (h/2) x (w/2).
MODELS = {
    "1.3B-480p": ("wan2.1-t2v-1.3b", (21, 60, 104)),  # 32,760 tokens
    "14B-480p": ("wan2.1-t2v-14b", (21, 60, 104)),  # 32,760 tokens
    "14B-720p": ("wan2.1-t2v-14b", (21, 90, 160)),  # 75,600 tokens
}
ATTENTIONS = ("flash", "cudnn", "sla", "sagesla")
# (warm-up forwards, timed forwards) per model; the 720p dense flash forward (~18 s) is timed once with
# no separate warm-up (it has no per-shape plan to build; the 480p runs warmed cuBLAS on the same model).
PLAN = {"1.3B-480p": (1, 3), "14B-480p": (1, 2), "14B-720p": (1, 1)}
PLAN_OVERRIDE = {("14B-720p", "flash"): (0, 1)}
TOPK = 0.1
TARGET_MS = {"1.3B-480p": 200.0}

SMOKE = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4,
    "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}


@contextlib.contextmanager
def attention_context(model: torch.nn.Module, attention: str, device: torch.device) -> Iterator[None]:
    """Install the self-attention and pin the SDPA backend for the dense variants."""
    if attention in ("sla", "sagesla"):
        set_attention(model, attention, TOPK)
        yield
        return
    set_attention(model, "dense", TOPK)
    if device.type != "cuda":
        with sdpa_kernel(SDPBackend.MATH):
            yield
        return
    backend = SDPBackend.FLASH_ATTENTION if attention == "flash" else SDPBackend.CUDNN_ATTENTION
    with sdpa_kernel(backend):
        yield


def make_inputs(model: torch.nn.Module, thw: tuple[int, int, int], text_len: int, device: torch.device,
                dtype: torch.dtype) -> dict:
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, *thw, generator=g, device=device, dtype=dtype),
        timestep=torch.tensor([757.0], device=device),
        encoder_hidden_states=torch.randn(1, text_len, cfg.text_dim, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )


def time_forwards(model: torch.nn.Module, inputs: dict, warmup: int, reps: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**inputs)[0]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**inputs)[0]
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                out = model(**inputs)[0]
                times.append((time.perf_counter() - t) * 1e3)
    finite = bool(torch.isfinite(out).all().item())
    return dict(
        ms=statistics.median(times), all_ms=[round(t, 2) for t in times], warmup_s=round(warm_s, 1),
        peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None, finite=finite,
        out_std=float(out.float().std().item()),
    )


def run_model(name: str, attentions: list[str], compiled: list[str], device: torch.device,
              smoke: bool) -> list[dict]:
    dtype = torch.float32 if smoke else torch.bfloat16
    config_name, thw = MODELS[name]
    config = SMOKE if smoke else wan_config(config_name)
    if smoke:
        thw = (2, 8, 8)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_transformer(config, attention="sla", sla_topk=TOPK, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(model, thw, 16 if smoke else 512, device, dtype)
    tokens = thw[0] * (thw[1] // 2) * (thw[2] // 2)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{name}: {params_b:.2f}B parameters, {tokens} tokens, built in {build_s:.1f} s", flush=True)
    rows = []
    warmup, reps = (1, 1) if smoke else PLAN[name]
    for attention in attentions:
        w, r = (1, 1) if smoke else PLAN_OVERRIDE.get((name, attention), (warmup, reps))
        rows.append(measure(model, inputs, name, attention, False, w, r, tokens, device))
    if compiled:
        torch._dynamo.config.cache_size_limit = 64
        for block in model.blocks:  # regional compile: the repeated block, compiled once, reused 30/40 times
            block.compile()
        for attention in compiled:
            rows.append(measure(model, inputs, name, attention, True, 2, 3, tokens, device))
    del model, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(model: torch.nn.Module, inputs: dict, name: str, attention: str, compiled: bool, warmup: int,
            reps: int, tokens: int, device: torch.device) -> dict:
    row: dict = dict(model=name, tokens=tokens, attention=attention, compiled=compiled, warmup=warmup, reps=reps)
    try:
        with attention_context(model, attention, device):
            row.update(time_forwards(model, inputs, warmup, reps, device))
    except Exception as exc:  # record and go on with the other variants
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--attentions", default=",".join(ATTENTIONS))
    parser.add_argument("--compiled", default="sla,sagesla", help="attentions for the compiled 1.3B forward")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    attentions = [a for a in args.attentions.split(",") if a]
    compiled = [a for a in args.compiled.split(",") if a]
    rows: list[dict] = []
    for name in [m for m in args.models.split(",") if m]:
        rows += run_model(name, attentions, compiled if name == "1.3B-480p" else [], device, args.smoke)

    from generator.attention import sla_triton

    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), topk=TOPK, rows=rows,
        attention_launch={str(k): v.name for k, v in sla_triton._TUNED.items()},
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dit_forward.json").write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}: one DiT forward, B=1, bf16, 81 frames, median ms (peak GB)")
    print(f"{'model':10s} " + " ".join(f"{a:>16s}" for a in attentions) + "  " +
          " ".join(f"{'compiled ' + a:>18s}" for a in compiled))
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for comp, names, width in ((False, attentions, 16), (True, compiled, 18)):
            for a in names:
                r = next((x for x in rows if x["model"] == name and x["attention"] == a and x["compiled"] == comp),
                         None)
                if r is None:
                    cells.append(f"{'-':>{width}s}")
                elif "error" in r:
                    cells.append(f"{'error':>{width}s}")
                else:
                    cells.append(f"{r['ms']:>{width - 7}.1f} ({r['peak_gb'] or 0:4.1f})")
        target = f"  [target <= {TARGET_MS[name]:.0f} ms]" if name in TARGET_MS else ""
        print(f"{name:10s} " + " ".join(cells[: len(attentions)]) + "  " + " ".join(cells[len(attentions):])
              + target)


if __name__ == "__main__":
    main()
