"""The mp4 tail (issue 15 item 4): how long H.264 encoding goes on after the last decoded frame is handed over.

Run anywhere (CPU only):  python bench/mp4_tail.py [--out DIR] [--sizes 832x480,1280x720] [--frames 81]
Frames are written to ffmpeg's stdin the way the engine streams them (in chunks of 4, paced like a decode of
``--decode-s`` seconds), then the tail is timed: from closing stdin to the finished file (x264 flushing its
lookahead and B-frames, then the +faststart rewrite). Two kinds of content: random noise (what random weights
give; x264 is slowest on it) and a smooth synthetic scene (moving gradients and shapes, closer to a real
video). Each x264 setting is measured on both; sizes of the files are reported too, since chat platforms cap
uploads. Prints a table, writes DIR/mp4_tail.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

SETTINGS: dict[str, list[str]] = {
    "fast (before)": ["-preset", "fast", "-crf", "19"],
    "fast, no lookahead": ["-preset", "fast", "-crf", "19", "-x264-params", "rc-lookahead=0:sync-lookahead=0:bframes=0"],
    "veryfast, no lookahead": ["-preset", "veryfast", "-crf", "19",
                               "-x264-params", "rc-lookahead=0:sync-lookahead=0:bframes=0"],
    "fast, zerolatency": ["-preset", "fast", "-tune", "zerolatency", "-crf", "19"],
}


def smooth_scene(frames: int, w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        r = 127 + 100 * np.sin((x + 6 * t) / 90.0)
        g = 127 + 100 * np.sin((y - 4 * t) / 70.0)
        cx, cy = w / 2 + w / 4 * np.cos(t / 12), h / 2 + h / 4 * np.sin(t / 9)
        b = np.where((x - cx) ** 2 + (y - cy) ** 2 < (h / 6) ** 2, 230.0, 40 + 30 * np.sin((x + y) / 50.0))
        out[t] = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    return out


def noise(frames: int, w: int, h: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def encode(frames: np.ndarray, args: list[str], decode_s: float, path: Path) -> dict[str, Any]:
    f, h, w, _ = frames.shape
    proc = subprocess.Popen(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "16", "-i", "-", "-an", "-c:v", "libx264", *args,
         "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(path)],
        stdin=subprocess.PIPE)
    assert proc.stdin is not None
    t0 = time.perf_counter()
    chunks = range(0, f, 4)
    for i, start in enumerate(chunks):
        target = t0 + decode_s * (i + 1) / len(chunks)
        proc.stdin.write(frames[start:start + 4].tobytes())
        time.sleep(max(0.0, target - time.perf_counter()))  # pace like the decoder (a benchmark, not a test)
    t_last = time.perf_counter()
    proc.stdin.close()
    proc.wait()
    tail = time.perf_counter() - t_last
    return {"tail_s": round(tail, 3), "bytes": path.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sizes", default="832x480,1280x720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--decode-s", type=float, default=1.6, help="pace of the simulated decode")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "rows": []}
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            for content, make in (("smooth", smooth_scene), ("noise", noise)):
                frames = make(args.frames, w, h)
                for name, x264 in SETTINGS.items():
                    r = encode(frames, x264, args.decode_s, Path(d) / "o.mp4")
                    row = {"size": size, "content": content, "setting": name, **r}
                    print(row, flush=True)
                    results["rows"].append(row)
    (out / "mp4_tail.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['cpus']} CPUs; decode paced over {args.decode_s} s\n")
    print("| size | content | setting | tail s | MB |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['size']} | {r['content']} | {r['setting']} | {r['tail_s']} | {r['bytes'] / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
