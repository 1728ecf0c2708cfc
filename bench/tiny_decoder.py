"""The tiny (TAEHV-layout) decoder on one GPU: whole vs chunked decode speed and memory at the published size.

Run on a CUDA machine:  PYTHONPATH=. python bench/tiny_decoder.py [--out DIR]
Random weights at widths 256/128/64/64 (taew2_1.pth's), bf16, 480p and 720p x 81 frames (21 latent frames).
Needs only torch and numpy. Prints a table, writes DIR/tiny_decoder.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.engine import taehv


def timed(fn, reps: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    spec = taehv.TinySpec(latent_channels=16, widths=(256, 128, 64, 64),
                          memblocks=tuple(((n, n),) * 3 for n in (256, 128, 64)), strides=(1, 2, 2),
                          file_strides=(1, 2, 2), patch=1)
    torch.manual_seed(0)
    model = taehv.TinyDecoder(spec).to(dev, torch.bfloat16).eval().requires_grad_(False)
    rows = []
    for name, (h, w) in {"480p": (60, 104), "720p": (90, 160)}.items():
        z = torch.randn(1, 16, 21, h, w, device=dev)
        whole = taehv.decode(model, z)
        for mode, fn in [("whole", lambda z=z: taehv.decode(model, z)),
                         *[(f"chunk{c}", lambda z=z, c=c: list(taehv.iter_decoded(model, z, chunk_frames=c)))
                           for c in (1, 4, 7)],
                         ("uint8 chunk4 (engine)", lambda z=z: taehv.decode_uint8(model, z))]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sec = timed(fn)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            rows.append({"size": name, "mode": mode, "seconds": round(sec, 4), "peak_gib": round(peak, 2)})
            print(rows[-1], flush=True)
        chunked = torch.cat(list(taehv.iter_decoded(model, z, chunk_frames=4)), dim=2)
        diff = (chunked.float() - whole.float()).abs().max().item()
        rows.append({"size": name, "mode": "chunk4 vs whole max abs diff (bf16)", "value": diff,
                     "frames": int(whole.shape[2]), "shape": list(whole.shape)})
        print(rows[-1], flush=True)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tiny_decoder.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
