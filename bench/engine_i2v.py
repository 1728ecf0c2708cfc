"""Wan2.2-I2V-A14B 720p whole job on one GPU (issue 3 item 8, the I2V path): random weights at the real sizes.

Run on a CUDA machine:  PYTHONPATH=. python bench/engine_i2v.py [--out DIR] [--offload auto|yes|no]
                        [--precision bf16|fp8] [--mem-cap-gib 80] [--compile]
Builds umT5-XXL, both A14B experts (36 input channels) and the Wan2.1 VAE with random bf16 weights, hands them to
a ``TurboEngine`` and renders a 1280x720, 81-frame I2V job from a generated image through the normal ``render``
path (image latent, mask, expert switch at t < 0.9), timing every stage and the peak GPU memory. With offload
(default "auto": when the card has under 100 GiB) the experts and the text encoder live on the CPU and only the
running expert is on the GPU, which is how the two experts fit an 80 GB card. ``--precision fp8`` builds the
experts with fp8 block linears (~14 GiB each); ``--mem-cap-gib`` caps this process's GPU memory
(``torch.cuda.set_per_process_memory_fraction``) to play an 80 GB card on a larger one, and offload "auto"
then decides from the cap. ``--compile`` regionally compiles both experts (warm-up job first).
Prints a table, writes DIR/engine_i2v.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import BF16, DEV, gib, random_umt5_xxl, random_vae

from generator.engine.api import RenderJob
from generator.engine.options import EngineOptions, ModelOptions
from generator.engine.runtime import TurboEngine
from generator.engine.tiny import tiny_tokenizer
from generator.engine.transformer import build_transformer
from generator.engine.wan_configs import wan_config
from generator.request import GenerationRequest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--offload", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--mem-cap-gib", type=float, default=0.0)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(DEV)
    usable = props.total_memory
    if args.mem_cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / props.total_memory), 0)
        usable = min(usable, int(args.mem_cap_gib * 2**30))
    # Resident weights: two experts + umT5-XXL (~11 GiB) + VAE, plus ~25 GiB of activations at 720p.
    expert_gib = 14 if args.precision == "fp8" else 28
    need = (2 * expert_gib + 11 + 25) * 2**30
    offload = args.offload == "yes" or (args.offload == "auto" and usable < need)
    results: dict[str, Any] = {"card": props.name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
                               "offload": offload, "precision": args.precision, "mem_cap_gib": args.mem_cap_gib,
                               "compile": args.compile}
    print(f"card {props.name}, {gib(props.total_memory)} GiB, offload={offload}", flush=True)

    options = EngineOptions(device="cuda", offload="model" if offload else "none",
                            models={"a14b": ModelOptions(kind="wan2.2-i2v-a14b", label="A14B random")})
    engine = TurboEngine(options)
    t0 = time.perf_counter()
    text = random_umt5_xxl()
    if offload:
        text = text.to("cpu")
    vae = random_vae()
    experts = []
    for seed in (0, 1):  # high-noise, then low-noise expert
        torch.manual_seed(seed)
        m = build_transformer(wan_config("wan2.2-i2v-a14b"), attention="sla", device=DEV, dtype=BF16,
                              precision=args.precision)
        if args.compile:
            m.compile_repeated_blocks(fullgraph=False)
        experts.append(m.to("cpu") if offload else m)
        torch.cuda.empty_cache()
    bundle = engine.adopt("a14b", experts=experts, text_encoder=text, tokenizer=tiny_tokenizer(), vae=vae, mode="i2v")
    bundle.offload_dit = bundle.offload_text = offload
    results["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"built A14B stack in {results['build_s']}s, {gib(torch.cuda.memory_allocated())} GiB on the GPU", flush=True)

    image = out / "input.png"
    Image.effect_noise((1280, 720), 64).convert("RGB").save(image)

    def render(steps: int, seed: int) -> dict[str, Any]:
        req = GenerationRequest(mode="i2v", prompt=f"the scene comes alive {seed}", image="bench", model="a14b",
                                resolution="720p", aspect="16:9", frames=81, steps=steps, seed=seed)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = engine.render(RenderJob(job_id=seed, request=req, image_path=image, output_path=out / "i2v.mp4"),
                            progress=lambda _p: None, cancelled=lambda: False)
        return {"steps": steps, "wall_s": round(time.perf_counter() - t, 3), "size": f"{res.width}x{res.height}",
                "timings": {k: round(v, 4) for k, v in res.timings.items()}, "bytes": res.bytes,
                "peak_gib": gib(torch.cuda.max_memory_allocated()), "attention": engine.last_attention}

    # Triton compile and tuning at this shape (4 steps when compiling, so both experts meet the compiler)
    results["warmup"] = render(4 if args.compile else 1, 1)
    print("warm-up", results["warmup"], flush=True)
    results["job"] = render(4, 2)
    print("job", results["job"], flush=True)
    (out / "engine_i2v.json").write_text(json.dumps(results, indent=2))
    t = results["job"]["timings"]
    steps = " / ".join(f"{t.get(f'step_{i}', float('nan')):.3f}" for i in range(1, 5))
    print("\n| case | precision | offload | text | image latent | steps (s) | decode | encode | job total | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| A14B I2V 720p | {args.precision}{' compiled' if args.compile else ''} | {offload} | {t.get('text', 0):.3f} | {t.get('image', t.get('condition', 0)):.3f} | "
          f"{steps} | {t.get('decode', 0):.3f} | {t.get('encode', 0):.3f} | {t['total']:.3f} | "
          f"{results['job']['peak_gib']} |")
    print("all timings:", json.dumps(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
