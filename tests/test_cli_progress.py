"""``turbobot generate``'s progress display, as a user sees it on stderr: every phase of the job (prompt,
sampling step k/n, decoding, mp4 encoding) with its own progress, not "step n/n 100%" through the end."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = str(ROOT / "tests" / "fakes" / "discord_engine.py") + ":create"
GATED = (("[1/4] encoding the prompt", "text"), ("[3/4] decoding the video", "decode"),
         ("[4/4] encoding the mp4", "encode"))


def test_generate_shows_each_phase_with_its_own_progress(tmp_path: Path) -> None:
    shutil.copyfile(ROOT / "config.toml", tmp_path / "config.toml")
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "TURBOBOT_CONFIG")}
    # The test engine stays in each gated phase until the gate is opened: no timing involved.
    env.update(TURBOBOT_ENGINE_FACTORY=ENGINE, TURBOBOT_TEST_GATES=str(gates))
    proc = subprocess.Popen(
        [sys.executable, "-m", "turbobot.cli", "generate", "a tide coming in [phases]", "--steps", "2",
         "--frames", "9", "--seed", "5"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for words, gate in GATED:
            while not any(words in line for line in seen):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                assert line is not None, "generate ended early:\n" + "\n".join(seen)
                seen.append(line)
            (gates / f"1-{gate}").touch()
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert proc.returncode == 0, "\n".join(seen)
    assert "job 1 succeeded" in out
    progress = [line for line in seen if line.startswith("job #1: [")]
    phases = [line.split("]")[0] for line in progress]
    assert phases == sorted(phases), progress  # never goes back
    assert {"job #1: [1/4", "job #1: [3/4", "job #1: [4/4"} <= set(phases), progress
    decoding = next(line for line in progress if "decoding" in line)
    assert "100%" not in decoding and "step" not in decoding
    assert all("sampling" in line and "step" in line for line in progress if line.startswith("job #1: [2/4]"))
