"""The ``turbobot`` command as a user runs it: real subprocesses, a real SQLite file, real mp4s."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from generator.engine.video import probe

ROOT = Path(__file__).resolve().parents[1]
# Short jobs keep the suite fast; the full default job is what the README's command runs.
FAST = ["--frames", "9", "--steps", "2", "--no-progress"]


def turbobot(cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "TURBOBOT_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "turbobot.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copyfile(ROOT / "config.toml", tmp_path / "config.toml")
    return tmp_path


def db_rows(workdir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(workdir / "data" / "turbobot.db") as conn:
        return conn.execute(sql).fetchall()


def test_generate_leaves_a_job_row_and_a_playable_mp4(workdir: Path) -> None:
    out = turbobot(workdir, "generate", "a red fox running through snow", "--seed", "42", "--json", *FAST)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["seed"] == 42 and info["demo_model"] is True
    mp4 = Path(info["output"])
    assert mp4.parent == workdir / "data" / "outputs" and mp4.name.startswith(f"t2v_{info['job_id']}_42_")
    video = probe(mp4)
    assert (video.codec, video.pix_fmt, video.width, video.height, video.frames) == ("h264", "yuv420p", 832, 480, 9)
    assert video.faststart and video.fps == 16
    ((state, seed, attempts, platform),) = db_rows(workdir, "select state, seed, attempts, platform from jobs")
    assert (state, seed, attempts, platform) == ("succeeded", 42, 1, "cli")
    ((path, size, frames),) = db_rows(workdir, "select path, bytes, frames from outputs")
    assert (Path(path), size, frames) == (mp4, mp4.stat().st_size, 9)

    listing = turbobot(workdir, "jobs")
    assert listing.returncode == 0 and "succeeded" in listing.stdout and "42" in listing.stdout


def test_generate_human_output_and_inline_flags(workdir: Path) -> None:
    out = turbobot(workdir, "generate", "a cat --ar 1:1 --seed 7", *FAST, "--out", "copy.mp4")
    assert out.returncode == 0, out.stderr
    assert "seed: 7" in out.stdout and "untrained demo model" in out.stdout
    assert probe(workdir / "copy.mp4").width == 640


def test_image_to_video_from_a_local_file(workdir: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, format="JPEG")
    (workdir / "in.jpg").write_bytes(buf.getvalue())
    out = turbobot(workdir, "generate", "the grass sways", "--image", "in.jpg", "--json", *FAST)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(info["output"]).name.startswith(f"i2v_{info['job_id']}_")
    ((mode, image_rows),) = db_rows(workdir, "select mode, (select count(*) from inputs) from jobs")
    assert (mode, image_rows) == ("i2v", 1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["a fox --colour red"], "Unknown option --colour"),
        (["a fox", "--steps", "9"], "Steps must be from 1 to 4"),
        (["a fox", "--frames", "80"], "1 more than a multiple of 4"),
        (["a fox", "--res", "1080p"], "Resolution must be one of 480p, 720p"),
        (["x" * 900], "The prompt is too long: 900 characters"),
        (["a fox", "--model", "wan-99b"], "Model must be one of tiny-t2v"),
        (["a fox", "--image", "missing.png"], "Cannot read image missing.png"),
    ],
)
def test_bad_requests_get_a_clear_message_and_no_job(workdir: Path, args: list[str], needle: str) -> None:
    out = turbobot(workdir, "generate", *args)
    assert out.returncode == 1
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert not (workdir / "data" / "outputs").exists() or not any((workdir / "data" / "outputs").iterdir())


def test_corrupt_image_is_refused(workdir: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    (workdir / "bad.png").write_bytes(buf.getvalue()[:60])  # truncated
    out = turbobot(workdir, "generate", "move", "--image", "bad.png")
    assert out.returncode == 1 and "corrupt or truncated" in out.stderr


def _error_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("/dev/zero", "it is a character device, not a regular file"),
        ("/dev/urandom", "it is a character device, not a regular file"),
        ("fifo", "it is a pipe (FIFO), not a regular file"),
        ("dir", "it is a directory, not a regular file"),
    ],
)
def test_image_that_is_not_a_regular_file_is_refused_at_once(workdir: Path, source: str, needle: str) -> None:
    if source == "fifo":
        os.mkfifo(workdir / "pipe.png")  # nobody ever writes: reading it would block forever
        source = "pipe.png"
    elif source == "dir":
        (workdir / "pics.png").mkdir()
        source = "pics.png"
    elif not Path(source).exists():
        pytest.skip(f"{source} does not exist here")
    # The timeout is the "quickly": a read of /dev/zero grows without end and a FIFO read never returns.
    out = turbobot(workdir, "generate", "move", "--image", source, timeout=60)
    assert out.returncode == 1
    assert _error_lines(out) == [f"turbobot: Cannot use {source} as an image: {needle}."]
    assert not (workdir / "data").exists()  # refused before the database or a worker was touched


def test_image_over_the_upload_limit_is_refused_before_reading(workdir: Path) -> None:
    config = (workdir / "config.toml").read_text()
    assert "\nmax_image_bytes = " in config
    (workdir / "config.toml").write_text(config.replace("\nmax_image_bytes = ", "\nmax_image_bytes = 102400 #", 1))
    with (workdir / "huge.png").open("wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MB claimed, nothing to read
    out = turbobot(workdir, "generate", "move", "--image", "huge.png", timeout=60)
    assert out.returncode == 1
    assert _error_lines(out) == ["turbobot: Image huge.png is too big (50 MB); the limit is 100 KB."]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('[engine]\nattention = "flash"\n', "engine.attention = 'flash' is not allowed; use one of: auto, sagesla, sla, dense"),
        ("[quotas]\nmax_queued_per_user = 0\n", "quotas.max_queued_per_user must be at least 1"),
        ('[models.big]\nkind = "wan2.1-t2v-14b"\n', "models.big.transformer must be set"),
        ("[engine\n", "is not valid TOML"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(workdir: Path, config: str, needle: str) -> None:
    (workdir / "config.toml").write_text(config)
    out = turbobot(workdir, "generate", "a fox")
    assert out.returncode == 2
    assert "configuration error" in out.stderr and needle in out.stderr


def test_db_upgrade_and_check(workdir: Path) -> None:
    up = turbobot(workdir, "db", "upgrade")
    assert up.returncode == 0 and "up to date" in up.stdout
    assert (workdir / "data" / "turbobot.db").exists()
    check = turbobot(workdir, "db", "check")
    assert check.returncode == 0 and "agree" in check.stdout


def test_run_with_nothing_enabled_says_how_to_configure(workdir: Path) -> None:
    (workdir / "config.toml").write_text("[web]\nenabled = false\n")
    out = turbobot(workdir, "run")
    assert out.returncode == 2
    assert "DISCORD_TOKEN" in out.stderr and "TELEGRAM_TOKEN" in out.stderr


def test_run_serves_the_console_alone_and_stops_on_sigterm(workdir: Path) -> None:
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = (ROOT / "config.toml").read_text().replace("port = 8080", f"port = {port}")
    (workdir / "config.toml").write_text(cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "TURBOBOT_CONFIG")}
    proc = subprocess.Popen([sys.executable, "-m", "turbobot.cli", "run"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        page = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "turbobot" in page.lower(), proc.stderr.read() if proc.poll() is not None else "no page"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{port}/" in out and "set DISCORD_TOKEN" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
