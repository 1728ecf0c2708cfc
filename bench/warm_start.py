"""Worker start to ready for the 1.3B model on one GPU, with a cold and then a warm compile cache (issue 14 item 4).

Run on a CUDA machine:  PYTHONPATH=. python bench/warm_start.py [--out DIR] [--precision fp8|bf16]
Writes a random-weight Wan2.1 1.3B DiT as a diffusers folder once, then starts two fresh processes one after
the other, each doing what a worker does at start for that model: load the DiT from disk (``load_transformer``,
fp8 requantized while loading), regional compile with the cache folder of ``engine.compile_cache_dir``, and
``TurboEngine.warm_up`` (the configured default shape, then a second one so the token count goes dynamic).
The first process finds the cache empty, the second finds what the first left. The text encoder and VAE are
not loaded here (stand-ins): their load time is disk speed and is reported apart when known.
Prints a table, writes DIR/warm_start.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(folder: Path, cache: Path, precision: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch

    from generator.engine import tiny
    from generator.engine.options import EngineOptions, ModelOptions
    from generator.engine.runtime import TurboEngine
    from generator.engine.transformer import load_transformer
    from generator.engine.wan_configs import wan_config

    options = EngineOptions(device="cuda", offload="none", compile_cache_dir=cache,
                            models={"b13": ModelOptions(kind="wan2.1-t2v-1.3b", precision=precision)})
    engine = TurboEngine(options)
    t_import = time.perf_counter() - t_start
    t0 = time.perf_counter()
    dit = load_transformer(folder, config=wan_config("wan2.1-t2v-1.3b"), attention="sla", device=engine.device,
                           dtype=torch.bfloat16, precision=engine.precision_for("b13", options.models["b13"]))
    torch.cuda.synchronize()
    t_load = time.perf_counter() - t0
    engine._compile(dit)
    engine.adopt("b13", experts=[dit], text_encoder=tiny.tiny_text_encoder(), tokenizer=tiny.tiny_tokenizer(),
                 vae=tiny.tiny_vae())
    t0 = time.perf_counter()
    engine.warm_up()
    t_warm = time.perf_counter() - t0
    return {"import_s": round(t_import, 2), "load_dit_s": round(t_load, 2), "warm_up_s": round(t_warm, 2),
            "process_to_ready_s": round(time.perf_counter() - t_start, 2),
            "shapes": engine.warm_up_shapes(), "precision": dit.turbo_precision}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "CACHE"))
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.precision)), flush=True)
        return 0

    import torch

    from generator.engine.transformer import build_transformer
    from generator.engine.wan_configs import wan_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="warm_start_"))
    folder, cache = work / "dit", work / "compile_cache"
    torch.manual_seed(0)
    dit = build_transformer(wan_config("wan2.1-t2v-1.3b"), attention="sla", device="cuda", dtype=torch.bfloat16)
    dit.save_pretrained(folder)
    del dit
    results: dict[str, Any] = {"card": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
                               "torch": torch.__version__, "runs": {}}
    for label in ("cold cache", "warm cache"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--precision", args.precision, "--child", str(folder),
                               str(cache)], capture_output=True, text=True, timeout=400)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        r = json.loads(line[len("RESULT "):])
        r["wall_s"] = round(wall, 2)
        results["runs"][label] = r
        print(label, r, flush=True)
    (out / "warm_start.json").write_text(json.dumps(results, indent=2))
    print("\n| cache | process wall s | imports | DiT load | warm-up | ready at |")
    print("|---|---|---|---|---|---|")
    for label, r in results["runs"].items():
        print(f"| {label} | {r['wall_s']} | {r['import_s']} | {r['load_dit_s']} | {r['warm_up_s']} | "
              f"{r['process_to_ready_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
