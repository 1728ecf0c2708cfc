"""What live previews cost a job: the same render with previews off and on, several runs each, medians.

    PYTHONPATH=. python bench/preview_overhead.py [--device cpu|cuda] [--runs 5] [--frames 33] [--steps 4]
        [--interval 0] [--linear] [--out DIR]

The embedded tiny model (random weights, the real code path) on the chosen device. "on" asks the engine for a
preview after every step but the last (``--interval 0``, the worst case; the service's default interval lets
through at most one per 4 s) and, like the worker, encodes each preview to a GIF in another thread while the
render goes on, so contention for the CPU and the interpreter lock is counted too. ``--linear`` drops the
model's tiny decoder so previews use the linear projection (what a model without ``tiny_decoder`` gets; on the
CPU the engine always uses it).
Runs alternate off/on so drift in machine load hits both. Prints the medians and writes DIR/preview_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine import create_engine
from generator.engine.api import Progress, RenderJob
from generator.engine.options import EngineOptions
from generator.engine.runtime import TurboEngine
from generator.request import GenerationRequest
from generator.scheduler.previews import encode_gif


def run_once(engine: TurboEngine, req: GenerationRequest, out: Path, interval: float | None,
             pool: ThreadPoolExecutor) -> tuple[float, int, float]:
    """(job seconds including the last GIF encode, previews made, seconds inside the engine's preview code)."""
    pending: list[Future[bytes]] = []

    def progress(p: Progress) -> None:
        if p.preview is not None:
            pending.append(pool.submit(encode_gif, p.preview))

    t0 = time.perf_counter()
    res = engine.render(RenderJob(job_id=1, request=req, output_path=out, preview_interval_s=interval),
                        progress=progress, cancelled=lambda: False)
    for f in pending:
        f.result()
    return time.perf_counter() - t0, len(pending), float(res.timings.get("preview", 0.0))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--linear", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()

    engine = create_engine(EngineOptions(device=args.device, compile=False))
    assert isinstance(engine, TurboEngine)
    engine.load()
    if args.linear:
        engine._bundle("tiny-t2v").tiny_key = None
    req = GenerationRequest(mode="t2v", prompt="a lighthouse at dusk, waves", model="tiny-t2v", frames=args.frames,
                            steps=args.steps, seed=7)
    results: dict[str, list[float]] = {"off": [], "on": []}
    made, inside = [], []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as pool:
        out = Path(tmp) / "v.mp4"
        run_once(engine, req, out, None, pool)  # warm-up: first-call costs are not the previews'
        run_once(engine, req, out, args.interval, pool)
        for _ in range(args.runs):
            for mode in ("off", "on"):
                secs, n, pre = run_once(engine, req, out, None if mode == "off" else args.interval, pool)
                results[mode].append(secs)
                if mode == "on":
                    made.append(n)
                    inside.append(pre)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    report = {
        "min_off_s": round(min(results["off"]), 4), "min_on_s": round(min(results["on"]), 4),
        "device": str(engine.device), "frames": args.frames, "steps": args.steps, "runs": args.runs,
        "interval_s": args.interval, "decoder": "linear" if args.linear or engine.device.type != "cuda" else "tiny (TAEHV)",
        "median_off_s": round(off, 4), "median_on_s": round(on, 4), "overhead_pct": round(100 * (on / off - 1), 2),
        "previews_per_job": statistics.median(made), "median_engine_preview_s": round(statistics.median(inside), 4),
        "off_s": [round(x, 4) for x in results["off"]], "on_s": [round(x, 4) for x in results["on"]],
    }
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preview_overhead.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
