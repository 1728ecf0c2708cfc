"""Whole-job engine benchmark on one GPU (issue 3 item 8): random weights at the real sizes, bf16, 81 frames.

Run on a CUDA machine:  PYTHONPATH=. python bench/engine.py [--out DIR] [--skip-14b] [--no-dense] [--no-stock]
                        [--compile] [--max-chunks 3,10,20] [--precision bf16|fp8]
For each case it builds umT5-XXL, the Wan DiT and the Wan2.1 VAE with random weights directly on the GPU,
hands them to a ``TurboEngine`` (``adopt``) and renders through the normal ``render`` path, timing every
stage (text encode, each DiT step, VAE decode, mp4 encode, whole job: prompt to mp4 bytes) and the peak GPU
memory. Beside it, in the same run: the stock diffusers transformer (its own SDPA attention processor)
timed for a few forwards and scaled to the stock WanPipeline recipe (50 steps x 2 forwards for guidance),
and the stock ``AutoencoderKLWan.decode`` against the engine's decode on the same latents.
``--compile`` then regionally compiles the DiT blocks (``compile_repeated_blocks``, as ``engine.compile``
does) and renders again; ``--max-chunks`` renders once more per value of the VAE decode's latent frames per pass
(``vae.DECODE_OPTIONS.max_chunk``; the default is used everywhere else). ``--no-dense`` / ``--no-stock`` skip
the dense-attention job and the stock transformer / stock VAE comparisons.
``--precision fp8`` builds the DiTs with fp8 block linears (``generator.engine.fp8``). ``--tiny`` then renders the
1.3B jobs again with a tiny (TAEHV-layout) decoder at the published widths, random weights. ``--lora 32,128``
writes one random LoRA per rank (all ten linears of every block) into a LoRA folder, runs the engine's warm-up
(which compiles each fp8 side-branch variant) and renders 1.3B jobs with each: fp8 runs the side branch, bf16
the fused weights. Each job records how many graphs dynamo compiled during it (0 after a complete warm-up).
Random weights give honest timings, never quality. Prints a table last, writes DIR/engine.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine.offline import ensure_offline

ensure_offline()

from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

from generator.engine import taehv  # noqa: E402
from generator.engine import vae as vae_ops  # noqa: E402
from generator.engine.api import RenderJob  # noqa: E402
from generator.engine.options import EngineOptions, ModelOptions  # noqa: E402
from generator.engine.runtime import TurboEngine  # noqa: E402
from generator.engine.tiny import tiny_tokenizer  # noqa: E402
from generator.engine.transformer import build_transformer  # noqa: E402
from generator.engine.wan_configs import wan_config  # noqa: E402
from generator.request import GenerationRequest  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def random_umt5_xxl() -> UMT5EncoderModel:
    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=DEV)
    model.encoder.embed_tokens = model.shared
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if name == "shared.weight" else 0.02)
    return model.eval().requires_grad_(False)


def random_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan().to(DEV, BF16).eval().requires_grad_(False)


def cuda_ms(fn: Any, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def render(engine: TurboEngine, name: str, resolution: str, *, attention: str, steps: int = 4, seed: int = 1,
           prompt: str, out: Path, decoder: str | None = None, preview: float | None = None,
           loras: str = "") -> dict[str, Any]:
    """One job, prompt to mp4 bytes. ``preview``: the live-preview interval (0 = after every step but the last);
    previews are GIF-encoded in another thread as the worker does, and the job's time includes the last encode."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from generator.scheduler.previews import encode_gif

    req = GenerationRequest(mode="t2v", prompt=prompt, model=name, resolution=resolution, aspect="16:9", frames=81,
                            steps=steps, seed=seed, attention=attention, loras=loras)
    pool = ThreadPoolExecutor(1)
    pending: list[Future[bytes]] = []

    def progress(p: Any) -> None:
        if getattr(p, "preview", None) is not None:
            pending.append(pool.submit(encode_gif, p.preview))

    from torch._dynamo.utils import counters

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    res = engine.render(RenderJob(job_id=seed, request=req, output_path=out, decoder=decoder,
                                  preview_interval_s=preview), progress=progress, cancelled=lambda: False)
    for f in pending:
        f.result()
    wall = time.perf_counter() - t0
    pool.shutdown()
    return {"attention": engine.last_attention, "steps": steps, "wall_s": round(wall, 3), "previews": len(pending),
            "loras": loras, "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
            "timings": {k: round(v, 4) for k, v in res.timings.items()}, "bytes": res.bytes,
            "peak_gib": gib(torch.cuda.max_memory_allocated()), "size": f"{res.width}x{res.height}"}


def stock_forward_ms(config: dict[str, Any], tokens_shape: tuple[int, ...], reps: int = 3) -> float:
    """The diffusers transformer with its own attention processor (SDPA), one forward, bf16."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    model = model.to_empty(device=DEV).to(BF16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.rope = type(model.rope)(config["attention_head_dim"], tuple(config["patch_size"]), 1024).to(DEV)
    model.eval().requires_grad_(False)
    x = torch.randn(*tokens_shape, device=DEV, dtype=BF16)
    emb = torch.randn(1, 512, 4096, device=DEV, dtype=BF16)
    ts = torch.tensor([900.0], device=DEV, dtype=BF16)
    with torch.no_grad():
        return cuda_ms(lambda: model(hidden_states=x, timestep=ts, encoder_hidden_states=emb, return_dict=False), reps)


def vae_compare(vae: AutoencoderKLWan, lat_shape: tuple[int, ...]) -> dict[str, Any]:
    z = torch.randn(*lat_shape, device=DEV)
    mean, std = vae_ops.latent_stats(vae, DEV, torch.float32)
    with torch.no_grad():
        ours_ms = cuda_ms(lambda: vae_ops.decode_uint8(vae, z), reps=2)
        stock_ms = cuda_ms(lambda: vae.decode((z * std + mean).to(BF16)).sample, reps=2)
        a = vae_ops.decode(vae, z).float()
        b = vae.decode((z * std + mean).to(BF16)).sample.float()
    return {"ours_to_uint8_ms": round(ours_ms, 1), "stock_decode_ms": round(stock_ms, 1),
            "max_abs_diff": float((a - b).abs().max())}


def lora_jobs(engine: TurboEngine, dit: Any, ranks: list[int], case: dict[str, Any], out: Path, tag: str) -> None:
    """Random LoRAs (ranks as given, every block linear) in the engine's LoRA folder, the engine's warm-up
    (compiles the fp8 branch variants when the DiT is compiled), then two jobs per LoRA."""
    from safetensors.torch import save_file

    from generator.engine.fp8 import BLOCK_LINEARS

    folder = engine.options.lora_folder
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    mods = dict(dit.named_modules())
    g = torch.Generator().manual_seed(7)
    for rank in ranks:
        sd = {}
        for i in range(len(dit.blocks)):
            for leaf in BLOCK_LINEARS:
                m, key = mods[f"blocks.{i}.{leaf}"], f"transformer.blocks.{i}.{leaf}"
                sd[f"{key}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
                sd[f"{key}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
        save_file({k: v.to(BF16) for k, v in sd.items()}, str(folder / f"r{rank}.safetensors"))
    engine.check_loras()
    t0 = time.perf_counter()
    engine.warm_up()
    case[f"lora_warm_up_s{tag}"] = round(time.perf_counter() - t0, 1)
    print("LoRA warm-up", case[f"lora_warm_up_s{tag}"], "s", flush=True)
    for rank in ranks:
        for i in range(2):
            r = render(engine, "b13", "480p", attention="sla", prompt=f"a fox running in snow l{i}", seed=60 + i,
                       out=out / "b13l.mp4", loras=f"r{rank}:0.8")
            case[f"job_{i}_sla{tag}_lora{rank}"] = r
            print(f"1.3B 480p LoRA rank {rank}", r, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-attention 1.3B job")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock transformer and stock VAE timings")
    ap.add_argument("--compile", action="store_true", help="then regionally compile the DiT blocks, render again")
    ap.add_argument("--max-chunks", default="", help="comma list: one more job per VAE decode chunk cap")
    ap.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--tiny", action="store_true", help="then render with a tiny (TAEHV) decoder too")
    ap.add_argument("--previews", action="store_true",
                    help="then the same jobs with a live preview after every step but the last (the worst case)")
    ap.add_argument("--lora", default="", help="comma list of ranks: then 1.3B jobs with a random LoRA of each")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(DEV)
    results: dict[str, Any] = {"card": props.name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
                               "precision": args.precision, "cases": {}}
    print(f"card {props.name}, torch {torch.__version__}", flush=True)

    options = EngineOptions(
        device="cuda", offload="none", lora_folder=out / "loras" if args.lora else None,
        models={
            "b13": ModelOptions(kind="wan2.1-t2v-1.3b", label="1.3B random"),
            "b14": ModelOptions(kind="wan2.1-t2v-14b", label="14B random"),
        },
    )
    engine = TurboEngine(options)
    t0 = time.perf_counter()
    text = random_umt5_xxl()
    vae = random_vae()
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    dit = build_transformer(wan_config("wan2.1-t2v-1.3b"), attention="sla", device=DEV, dtype=BF16,
                            precision=args.precision)
    engine.adopt("b13", experts=[dit], text_encoder=text, tokenizer=tok, vae=vae)
    print(f"built 1.3B stack in {time.perf_counter() - t0:.1f}s, {gib(torch.cuda.memory_allocated())} GiB", flush=True)

    case: dict[str, Any] = {}
    render(engine, "b13", "480p", attention="sla", steps=1, prompt="warm up", out=out / "w.mp4")  # compile/tune
    case["decode_options"] = str(vae_ops.DECODE_OPTIONS)
    results["cases"]["1.3B 480p"] = case
    for i, att in enumerate(("sla", "sla") if args.no_dense else ("sla", "sla", "dense")):
        r = render(engine, "b13", "480p", attention=att, prompt=f"a fox running in snow {i}", seed=10 + i,
                   out=out / "b13.mp4")
        case[f"job_{i}_{att}"] = r
        print("1.3B 480p", r, flush=True)
        (out / "engine.json").write_text(json.dumps(results, indent=2))
    if not args.no_stock:
        cfg13 = wan_config("wan2.1-t2v-1.3b")
        stock = stock_forward_ms(cfg13, (1, 16, 21, 60, 104))
        gc.collect()
        torch.cuda.empty_cache()
        case["stock_forward_ms"] = round(stock, 1)
        case["stock_wanpipeline_dit_s_scaled"] = round(stock * 100 / 1000, 1)
        case["vae_480p"] = vae_compare(vae, (1, 16, 21, 60, 104))
        print("1.3B stock forward", stock, "vae", case["vae_480p"], flush=True)
    tag = ""
    if args.compile:
        t0 = time.perf_counter()
        dit.compile_repeated_blocks(fullgraph=False)
        dit.turbo_compiled = True  # as engine._compile marks it: warm_up then covers it
        render(engine, "b13", "480p", attention="sla", steps=1, prompt="warm up compiled", out=out / "w.mp4")
        case["compile_warmup_s"] = round(time.perf_counter() - t0, 1)
        tag = "_compiled"
        for i in range(2):
            r = render(engine, "b13", "480p", attention="sla", prompt=f"a fox running in snow c{i}", seed=30 + i,
                       out=out / "b13.mp4")
            case[f"job_{i}_sla{tag}"] = r
            print("1.3B 480p compiled", r, flush=True)
            (out / "engine.json").write_text(json.dumps(results, indent=2))
    if args.tiny:  # the same jobs decoded by a tiny decoder at the published widths (random weights)
        spec = taehv.TinySpec(latent_channels=16, widths=(256, 128, 64, 64),
                              memblocks=tuple(((n, n),) * 3 for n in (256, 128, 64)), strides=(1, 2, 2),
                              file_strides=(1, 2, 2), patch=1)
        torch.manual_seed(0)
        engine._tinies["bench"] = taehv.TinyDecoder(spec).to(DEV, BF16).eval().requires_grad_(False)
        engine._bundles["b13"].tiny_key = "bench"
        render(engine, "b13", "480p", attention="sla", steps=1, prompt="warm up tiny", out=out / "w.mp4",
               decoder="tiny")
        for i in range(2):
            r = render(engine, "b13", "480p", attention="sla", prompt=f"a fox running in snow t{i}", seed=50 + i,
                       out=out / "b13t.mp4", decoder="tiny")
            case[f"job_{i}_sla{tag}_tiny"] = r
            print("1.3B 480p tiny decoder", r, flush=True)
            (out / "engine.json").write_text(json.dumps(results, indent=2))
    if args.previews:  # previews from the model's tiny decoder when it has one (after --tiny), else linear
        for i in range(2):
            r = render(engine, "b13", "480p", attention="sla", prompt=f"a fox running in snow p{i}", seed=30 + i,
                       out=out / "b13p.mp4", preview=0.0)
            case[f"job_{i}_sla{tag}_previews"] = r
            print("1.3B 480p with previews", r, flush=True)
            (out / "engine.json").write_text(json.dumps(results, indent=2))
    if args.lora:
        lora_jobs(engine, dit, [int(v) for v in args.lora.split(",")], case, out, tag)
        (out / "engine.json").write_text(json.dumps(results, indent=2))
    default_decode = vae_ops.DECODE_OPTIONS
    for mc in (int(v) for v in args.max_chunks.split(",") if v):
        vae_ops.DECODE_OPTIONS = replace(default_decode, max_chunk=mc)
        try:
            r = render(engine, "b13", "480p", attention="sla", prompt=f"a fox running in snow m{mc}", seed=40 + mc,
                       out=out / "b13.mp4")
        finally:
            vae_ops.DECODE_OPTIONS = default_decode
        case[f"job_maxchunk{mc}_sla{tag}"] = r
        print(f"1.3B 480p max_chunk {mc}{tag}", r, flush=True)
        (out / "engine.json").write_text(json.dumps(results, indent=2))
    (out / "engine.json").write_text(json.dumps(results, indent=2))

    if not args.skip_14b:
        del engine._bundles["b13"], dit
        gc.collect()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        torch.manual_seed(0)
        dit14 = build_transformer(wan_config("wan2.1-t2v-14b"), attention="sla", device=DEV, dtype=BF16,
                                  precision=args.precision)
        if args.compile:
            dit14.compile_repeated_blocks(fullgraph=False)
        engine.adopt("b14", experts=[dit14], text_encoder=text, tokenizer=tok, vae=vae)
        print(f"built 14B in {time.perf_counter() - t0:.1f}s, {gib(torch.cuda.memory_allocated())} GiB", flush=True)
        case14: dict[str, Any] = {}
        render(engine, "b14", "720p", attention="sla", steps=1, prompt="warm up 720", out=out / "w.mp4")
        r = render(engine, "b14", "720p", attention="sla", prompt="a fox running in snow 720", seed=20,
                   out=out / "b14.mp4")
        case14["job_sla"] = r
        print("14B 720p", r, flush=True)
        case14["vae_720p"] = vae_compare(vae, (1, 16, 21, 90, 160))
        print("vae 720p", case14["vae_720p"], flush=True)
        results["cases"]["14B 720p"] = case14
        (out / "engine.json").write_text(json.dumps(results, indent=2))

    print(f"\nprecision {args.precision}")
    print("\n| case | job | attention | text | steps (s) | decode | encode | job total | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cname, c in results["cases"].items():
        for k, r in c.items():
            if not k.startswith("job"):
                continue
            t = r["timings"]
            steps = " / ".join(f"{t[f'step_{i}']:.3f}" for i in range(1, r["steps"] + 1))
            print(f"| {cname} | {k} | {r['attention']} | {t.get('text', 0):.3f} | {steps} | {t['decode']:.3f} | "
                  f"{t['encode']:.3f} | {t['total']:.3f} | {r['peak_gib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
