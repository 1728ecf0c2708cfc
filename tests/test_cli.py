"""The ``turbobot`` command as a user runs it: real subprocesses, a real SQLite file, real mp4s."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator import media
from generator.media import probe

ROOT = Path(__file__).resolve().parents[1]
# Short jobs keep the suite fast; the full default job is what the README's command runs.
FAST = ["--frames", "9", "--steps", "2", "--no-progress"]


def turbobot(cwd: Path, *args: str, timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "TURBOBOT_CONFIG")}
    env.update(extra_env)
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
    ((state, seed, attempts, platform),) = db_rows(
        workdir, "select state, json_extract(request, '$.seed'), attempts, platform from jobs"
    )
    assert (state, seed, attempts, platform) == ("succeeded", 42, 1, "cli")
    ((path, size, frames),) = db_rows(workdir, "select path, bytes, frames from outputs")
    assert (Path(path), size, frames) == (mp4, mp4.stat().st_size, 9)

    listing = turbobot(workdir, "jobs")
    assert listing.returncode == 0 and "succeeded" in listing.stdout and "42" in listing.stdout
    assert_columns_line_up(listing.stdout)
    assert "alembic" not in listing.stderr and "INFO" not in listing.stderr, listing.stderr


def assert_columns_line_up(table: str) -> None:
    """Every value starts where its header starts (left-aligned) or ends where it ends (right-aligned)."""
    header, *rows = table.rstrip("\n").splitlines()
    assert rows
    names = header.split()
    starts = [header.index(n) for n in names]
    for row in rows:
        for name, start, nxt in zip(names, starts, [*starts[1:], None], strict=True):
            cell = row[start:nxt] if name not in ("id", "seed") else row[: start + len(name)]
            if name in ("id", "seed"):  # right-aligned: the value ends under the header's last letter
                assert cell.endswith(cell.strip()) and cell[-1] != " ", (name, row)
            else:
                assert cell[0] != " " and (nxt is None or cell.endswith("  ")), (name, row)


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


def test_quiet_terminal_and_a_start_message_while_the_worker_loads(workdir: Path) -> None:
    out = turbobot(workdir, "generate", "a fox", "--frames", "9", "--steps", "2")  # progress on (lines: no tty)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    # Only the progress display: no Alembic narration, no INFO lines from this process or the worker.
    assert all(line.startswith("job #1: ") for line in lines), lines
    loading = [i for i, line in enumerate(lines) if "starting the GPU worker and loading the model" in line]
    first_step = next(i for i, line in enumerate(lines) if "[1/4]" in line or "step 1/2" in line)
    assert loading and loading[0] < first_step, lines


def test_verbose_shows_the_worker_log_in_the_same_format(workdir: Path) -> None:
    out = turbobot(workdir, "-v", "generate", "a fox", *FAST)
    assert out.returncode == 0, out.stderr
    worker_lines = [line for line in out.stderr.splitlines() if " worker[" in line]
    assert worker_lines
    # The CLI's own format: "HH:MM:SS LEVEL worker[id] logger: message" (no date, no milliseconds).
    assert all(re.match(r"^\d\d:\d\d:\d\d [A-Z]+ worker\[[^\]]+\] [\w.]+: ", line) for line in worker_lines), worker_lines
    assert "alembic" in out.stderr  # debugging detail is there when asked for


@pytest.mark.parametrize("command", [["jobs"], ["db", "upgrade"], ["db", "check"]])
def test_commands_do_not_print_alembic_info(workdir: Path, command: list[str]) -> None:
    out = turbobot(workdir, *command)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_bad_flag_to_generate_shows_generate_usage(workdir: Path) -> None:
    out = turbobot(workdir, "generate", "a fox", "--colour", "red")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: turbobot generate ")
    assert "turbobot generate: error: unrecognized arguments: --colour red" in out.stderr
    jobs = turbobot(workdir, "jobs", "--bogus")
    assert jobs.stderr.startswith("usage: turbobot jobs ") and jobs.returncode == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_checks_the_port_before_starting_or_announcing(workdir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = (ROOT / "config.toml").read_text().replace("port = 8080", f"port = {port}")
        (workdir / "config.toml").write_text(cfg)
        out = turbobot(workdir, "run", timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""  # no "Web console: http://..." for a console that never listened
    assert _error_lines(out) == [
        f"turbobot: Cannot serve the web console on http://127.0.0.1:{port}/: port {port} is already in use "
        "(another turbobot or another program is listening). Stop it, or set another [web] port in config.toml."
    ]
    assert not (workdir / "data").exists()  # nothing started: no database, no worker


def test_run_refuses_a_host_that_is_not_here_before_starting(workdir: Path) -> None:
    cfg = (ROOT / "config.toml").read_text().replace('host = "127.0.0.1"', 'host = "192.0.2.1"')
    (workdir / "config.toml").write_text(cfg.replace("port = 8080", f"port = {_free_port()}"))
    out = turbobot(workdir, "run", timeout=60, TURBOBOT_ADMIN_TOKEN="t" * 40)
    assert out.returncode == 1 and out.stdout == ""
    (line,) = _error_lines(out)
    assert "192.0.2.1 is not an address of this machine" in line
    assert not (workdir / "data").exists()


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
        assert "turbobot" in page.lower(), proc.stderr.read() if proc.stderr and proc.poll() is not None else "no page"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{port}/" in out and "set DISCORD_TOKEN" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_run_whose_port_is_taken_touches_no_job(workdir: Path) -> None:
    # `turbobot run` a second time: it used to start its scheduler (requeueing and releasing jobs) before
    # the web console found its port taken.
    import socket

    assert turbobot(workdir, "generate", "a fox", *FAST).returncode == 0
    with sqlite3.connect(workdir / "data" / "turbobot.db") as conn:  # a job whose lease ran out
        conn.execute(
            "update jobs set state='running', attempts=1, worker_id='elsewhere:1.ab:0', "
            "lease_until='2000-01-01 00:00:00.000000'"
        )
    before = db_rows(workdir, "select state, attempts, worker_id, lease_until from jobs")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = (ROOT / "config.toml").read_text().replace("port = 8080", f"port = {port}")
        (workdir / "config.toml").write_text(cfg)
        out = turbobot(workdir, "run", timeout=60)
    assert out.returncode == 1 and f"127.0.0.1:{port}" in out.stderr and "already in use" in out.stderr
    assert "Traceback" not in out.stderr
    assert db_rows(workdir, "select state, attempts, worker_id, lease_until from jobs") == before


def test_frames_range_stated_in_help_and_readme_is_the_validated_one(workdir: Path) -> None:
    from generator.request import GenerationRequest, RequestError, validate
    from turbobot.config import Settings

    limits = Settings().request_limits
    accepted = []
    for frames in range(0, 100):
        try:
            validate(GenerationRequest(mode="t2v", prompt="a fox", frames=frames), limits)
        except RequestError:
            continue
        accepted.append(frames)
    assert accepted == list(range(5, 82, 4))
    stated = "5 to 81 in steps of 4"
    helptext = turbobot(workdir, "generate", "--help").stdout
    assert stated in " ".join(helptext.split())
    readme = (ROOT / "README.md").read_text()
    assert stated in readme
    for text in (helptext, readme, (ROOT / "config.toml").read_text()):
        assert "1 mod 4" not in text


def test_virtualenv_folder_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".venv/bin/python"], cwd=ROOT, check=False)
    assert out.returncode == 0, ".venv/ is not in .gitignore"


# --- the run command installs the runtime only: nothing at runtime may need a developer extra ------------

_HIDE_DEV_EXTRAS = '''
import sys

HIDDEN = set({hidden!r})


class _WithoutDevExtras:
    """Acts as if the developer extras were not installed: not found, not importable."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_WithoutDevExtras(f) if getattr(f, "__name__", "") == "PathFinder" else f for f in sys.meta_path]
'''


def _dev_only_modules() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=\[;! ]", d)[0].lower() for d in project["dependencies"]}
    dev = {re.split(r"[<>=\[;! ]", d)[0].lower() for d in project["optional-dependencies"]["dev"]}
    return sorted(name.replace("-", "_") for name in dev - runtime)


def test_runtime_needs_no_developer_extra(workdir: Path, tmp_path: Path) -> None:
    hidden = _dev_only_modules()
    assert {"triton", "selenium", "hypothesis", "ruff", "pytest"} <= set(hidden)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_DEV_EXTRAS.format(hidden=hidden))
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])

    # Every runtime module imports (the Triton kernel modules are only imported once Triton is found).
    probe_code = (
        "import importlib, importlib.util, pkgutil\n"
        "assert importlib.util.find_spec('triton') is None and importlib.util.find_spec('pytest') is None\n"
        # migrations.env runs only inside an Alembic command (the generate below runs it that way).
        "optional = {'generator.attention.sla_triton', 'generator.attention.block_map', 'generator.engine.vae_triton',\n"
        "            'migrations.env'}\n"
        "for pkg in ('turbobot', 'bots', 'generator', 'storage', 'migrations'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if info.name not in optional and not info.name.startswith('migrations.versions'):\n"
        "            importlib.import_module(info.name)\n"
        "print('imported')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "TURBOBOT_CONFIG")}
    env["PYTHONPATH"] = path
    out = subprocess.run([sys.executable, "-c", probe_code], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]

    # A whole job, worker process included (it inherits the environment, so the extras are hidden there too).
    job = turbobot(workdir, "generate", "a red fox", "--json", *FAST, PYTHONPATH=path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert Path(json.loads(job.stdout.strip().splitlines()[-1])["output"]).exists()


def test_readme_run_command_installs_the_runtime_only_and_ci_follows_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    run = 'pip install torch==2.13.0 && pip install -e . && turbobot generate "a red fox running through snow" && turbobot run'
    test = 'pip install -e ".[dev]" && python -m pytest -q'
    assert run in readme and test in readme
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [ci.index(s) for s in ("pip install -q torch==2.13.0", "pip install -q -e .\n", "storage.migrate check",
                                   'pip install -q -e ".[dev]"', "ruff check .", "python -m pytest -q")]
    assert steps == sorted(steps)


def test_draft_flag_reaches_the_engine_as_the_tiny_decoder(workdir: Path) -> None:
    # Same seed and parameters; only --draft differs. The embedded demo model has a tiny decoder, so the draft
    # is decoded by it and its pixels differ from the full VAE's (the flag used to stop at the request).
    outs = []
    for extra in ([], ["--draft"]):
        out = turbobot(workdir, "generate", "a red fox", "--seed", "7", "--json", *FAST, *extra)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    frames = [media.decode_frames(o["output"]) for o in outs]
    assert frames[0].shape == frames[1].shape
    assert np.abs(frames[0].astype(np.int16) - frames[1].astype(np.int16)).mean() > 1.0


def test_generate_extend_continues_a_job_into_one_mp4(workdir: Path) -> None:
    first = turbobot(workdir, "generate", "a red fox", "--seed", "7", "--json", "--frames", "5", "--steps", "1",
                     "--no-progress")
    assert first.returncode == 0, first.stderr
    parent = json.loads(first.stdout.strip().splitlines()[-1])
    ext = turbobot(workdir, "generate", "--extend", str(parent["job_id"]), "the fox jumps", "--json", "--no-progress")
    assert ext.returncode == 0, ext.stderr
    info = json.loads(ext.stdout.strip().splitlines()[-1])
    assert info["seed"] == 7 and info["prompt"] == "the fox jumps" and info["frames"] == 9
    video = probe(info["output"])
    assert (video.codec, video.pix_fmt, video.frames, video.faststart) == ("h264", "yuv420p", 9, True)
    ((lineage, parent_id),) = db_rows(workdir, f"select lineage, parent_id from jobs where id = {info['job_id']}")
    assert (lineage, parent_id) == ("extend", parent["job_id"])
    # Bad input: a missing job, and settings that belong to the parent; nothing new is queued.
    missing = turbobot(workdir, "generate", "--extend", "999", "--no-progress")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    extra = turbobot(workdir, "generate", "--extend", str(parent["job_id"]), "--steps", "2", "--no-progress")
    assert extra.returncode != 0 and "--extend takes only a prompt" in extra.stderr
    assert len(db_rows(workdir, "select id from jobs")) == 2
