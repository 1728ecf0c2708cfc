"""The deployment files of docs/deploy.md (``deploy/``): the shared config loads with the real loader and names
the compose services, every secret they use is in ``env.example``, compose's and the systemd units' commands
are real ``turbobot`` commands, and a smoke test runs the units' commands as a bot host and a worker host on a
real PostgreSQL and a real S3-compatible server (moto) until one job's video is in the bucket. ``docker
compose config`` and ``systemd-analyze verify`` check the files too where those programs exist."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_support import MotoServer, free_port, moto_server
from scheduler_support import ENGINE_SPEC, session_mp4
from sqlalchemy.engine import make_url

from turbobot.cli import build_parser
from turbobot.config import Settings, load_settings, read_secret

try:  # the PostgreSQL fixtures (their module skips itself without asyncpg: then only the smoke test skips)
    from test_storage_postgres import pg_server_url, pg_url  # noqa: F401  (fixtures)
except pytest.skip.Exception as _no_pg:
    _NO_PG_REASON = str(_no_pg)

    @pytest.fixture
    def pg_url() -> str:
        pytest.skip(_NO_PG_REASON)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIG = DEPLOY / "config.toml"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
UNITS = {"bot": DEPLOY / "systemd" / "turbobot-bot.service", "worker": DEPLOY / "systemd" / "turbobot-worker.service"}
# Where the units and the image put things; the smoke test maps them into its temp folder.
SRV, ETC_CONFIG, ETC_ENV = "/srv/turbobot", "/etc/turbobot/config.toml", "/etc/turbobot/env"
TURBOBOT_SERVICES = ("migrate", "bot", "worker", "worker-gpu1", "worker-cpu")


# ------------------------------------------------------------------------------------------- readers
def env_example() -> dict[str, str]:
    """``deploy/env.example`` as the variables it sets (plain KEY=VALUE lines, as compose and systemd read)."""
    out: dict[str, str] = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S*)", line)
        assert m, f"env.example:{n}: not a plain KEY=VALUE line (no quotes, spaces or export): {line!r}"
        assert m[1] not in out, f"env.example:{n}: {m[1]} is set twice"
        out[m[1]] = m[2]
    return out


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> values (a key may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line and not line.endswith("\\"), f"{path.name}:{n}: {raw!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def compose_file() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: cannot read deploy/compose.yaml")
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def turbobot_args(argv: list[str]) -> Any:
    """``argv`` (``turbobot ...`` or a path to it) parsed by the real command-line parser."""
    assert Path(argv[0]).name == "turbobot", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed why
        raise AssertionError(f"not a turbobot command: {shlex.join(argv)}") from exc


def secret_env_names(settings: Settings) -> set[str]:
    """Every environment variable the settings read a secret from: each section's ``*_env`` keys, and
    PGPASSWORD when the PostgreSQL URL carries no password (the driver reads it)."""
    names = set()
    for section in dataclasses.fields(settings):
        value = getattr(settings, section.name)
        if dataclasses.is_dataclass(value):
            names |= {getattr(value, f.name) for f in dataclasses.fields(value) if f.name.endswith("_env")}
    url = make_url(settings.database.url)
    if url.get_backend_name() == "postgresql" and url.password is None:
        names.add("PGPASSWORD")
    return {n for n in names if n}


def compose_variables() -> set[str]:
    """Variables compose.yaml reads: ``${VAR}`` / ``$VAR`` (from deploy/.env) and ``$$VAR`` (a container's)."""
    text = "\n".join(line for line in COMPOSE.read_text(encoding="utf-8").splitlines()
                     if not line.lstrip().startswith("#"))
    return set(re.findall(r"\${1,2}\{?([A-Za-z_][A-Za-z0-9_]*)", text))


@pytest.fixture
def deploy_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a host set up from env.example (and nothing else turbobot reads)."""
    for name in list(os.environ):
        if name.startswith("TURBOBOT_") or name in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "PGPASSWORD"):
            monkeypatch.delenv(name)
    values = env_example()
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


# ------------------------------------------------------------------------------------ static checks
def test_config_loads_with_the_real_loader(deploy_env: dict[str, str]) -> None:
    from bots.web.security import load_admin_token

    settings = load_settings(CONFIG)
    url = make_url(settings.database.url)
    assert (url.drivername, url.host, url.password) == ("postgresql+asyncpg", "db", None)
    assert settings.store.backend == "s3" and settings.store.bucket
    assert urllib.parse.urlsplit(settings.store.endpoint_url).hostname == "minio"
    assert settings.web.enabled and settings.web.host == "0.0.0.0"
    # The console refuses 0.0.0.0 without an admin token; env.example's placeholder is one it accepts.
    assert load_admin_token(settings) == deploy_env["TURBOBOT_ADMIN_TOKEN"]
    assert read_secret(settings.store.access_key_env) and read_secret(settings.store.secret_key_env)
    # Absolute paths: the same file works in the image and with the units (cwd /srv/turbobot either way).
    for p in (settings.app.data_dir, settings.app.outputs_dir, settings.app.inputs_dir, settings.store.cache_dir,
              settings.engine.compile_cache_dir, settings.loras.folder):
        assert p.startswith(SRV + "/"), p
    # No secret in the file: nothing but names of variables (the loader refuses secret-looking values too).
    for value in (deploy_env[k] for k in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "TURBOBOT_ADMIN_TOKEN")):
        assert value not in CONFIG.read_text(encoding="utf-8")


def test_the_filled_in_env_file_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", "--no-index", "deploy/.env"], cwd=ROOT, check=False)
    assert out.returncode == 0, "deploy/.env (the secrets compose.yaml reads) is not in .gitignore"


def test_config_points_at_the_compose_services(deploy_env: dict[str, str]) -> None:
    settings = load_settings(CONFIG)
    services = compose_file()["services"]
    url = make_url(settings.database.url)
    db = services[url.host]
    assert db["image"].startswith("postgres:16")
    assert (db["environment"]["POSTGRES_USER"], db["environment"]["POSTGRES_DB"]) == (url.username, url.database)
    assert db["environment"]["POSTGRES_PASSWORD"].startswith("${PGPASSWORD")  # the password the hosts use
    endpoint = urllib.parse.urlsplit(settings.store.endpoint_url)
    assert services[endpoint.hostname]["image"].startswith("minio/minio") and endpoint.port == 9000
    bucket_cmd = " ".join(services["bucket"]["command"])
    assert f"http://{endpoint.hostname}:{endpoint.port}" in bucket_cmd
    assert f"mc mb --ignore-existing store/{settings.store.bucket}" in bucket_cmd
    assert f"{settings.web.port}:{settings.web.port}" in services["bot"]["ports"]


def test_every_secret_is_in_env_example(deploy_env: dict[str, str]) -> None:
    settings = load_settings(CONFIG)
    listed = set(deploy_env)
    from_config = secret_env_names(settings)
    assert from_config >= {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TURBOBOT_ADMIN_TOKEN",
                           "DISCORD_TOKEN", "TELEGRAM_TOKEN"}
    assert from_config <= listed, f"not in env.example: {sorted(from_config - listed)}"
    from_compose = compose_variables()
    assert {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= from_compose
    assert from_compose <= listed, f"not in env.example: {sorted(from_compose - listed)}"
    # And nothing stale: every variable env.example sets is read by something.
    assert listed <= from_config | from_compose, f"read by nothing: {sorted(listed - from_config - from_compose)}"
    # Chat tokens are empty: a placeholder token would start a bot that cannot log in.
    assert deploy_env["DISCORD_TOKEN"] == deploy_env["TELEGRAM_TOKEN"] == ""


def test_compose_runs_real_turbobot_commands() -> None:
    services = compose_file()["services"]
    assert set(services) == {"db", "minio", "bucket", *TURBOBOT_SERVICES}
    commands = {}
    for name in TURBOBOT_SERVICES:
        svc = services[name]
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert svc["env_file"] == ".env" and svc["environment"]["TURBOBOT_CONFIG"] == ETC_CONFIG
        assert f"./config.toml:{ETC_CONFIG}:ro" in svc["volumes"]
        commands[name] = args = turbobot_args(svc["command"])
        if name != "migrate":  # every host waits for the migration and the bucket
            assert svc["depends_on"] == {"migrate": {"condition": "service_completed_successfully"},
                                         "bucket": {"condition": "service_completed_successfully"}}
            assert int(svc["stop_grace_period"].rstrip("s")) >= 60  # time to hand running jobs back
        if name.startswith("worker"):
            assert args.command == "worker" and args.devices
        if name in ("worker", "worker-gpu1"):
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"]
    assert (commands["migrate"].command, commands["migrate"].db_command) == ("db", "upgrade")
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no" and services["bucket"]["restart"] == "no"
    assert commands["bot"].command == "run" and commands["bot"].no_workers
    assert services["bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for name in ("db", "minio"):
        assert services[name]["healthcheck"]["test"]
    assert "profiles" not in services["worker"] and services["worker-cpu"]["profiles"] == ["cpu"]


def test_dockerfile_installs_torch_first_then_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    torch = next(i for i, line in enumerate(lines) if "pip install torch==2.13.0" in line)
    project = next(i for i, line in enumerate(lines) if re.search(r"pip install \"\.\[postgres,s3\]\"", line))
    assert torch < project
    for line in lines:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert turbobot_args(json.loads(cmd[4:])).command == "run"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for src in ("turbobot/", "bots/", "generator/", "storage/", "migrations/", "deploy/config.toml"):
        assert f"!{src}" in ignore


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    tool = _compose_command()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: compose.yaml not validated by it")
    # As the guide says: copy env.example to deploy/.env, then use the file (here in a copy of deploy/).
    deploy = tmp_path / "repo" / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns(".env"))
    shutil.copyfile(ENV_EXAMPLE, deploy / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for profiles in ([], ["--profile", "cpu", "--profile", "gpu2"]):
        done = subprocess.run([*tool, "-f", str(deploy / "compose.yaml"), *profiles, "config"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert "service_completed_successfully" in done.stdout
    services = subprocess.run([*tool, "-f", str(deploy / "compose.yaml"), "config", "--services"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=env)
    assert set(services.stdout.split()) >= {"db", "minio", "bucket", "migrate", "bot", "worker"}, services.stderr
    # Without deploy/.env it stops with a message saying what to do.
    (deploy / ".env").unlink()
    done = subprocess.run([*tool, "-f", str(deploy / "compose.yaml"), "config"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0


@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_units(role: str) -> None:
    u = unit(UNITS[role])
    service = u["Service"]
    args = turbobot_args(shlex.split(one(service, "ExecStart")))
    if role == "bot":
        assert args.command == "run" and args.no_workers
    else:
        assert args.command == "worker" and args.devices
    # SIGTERM to the main process only: the supervisor stops its workers (handing their jobs back) itself.
    assert one(service, "KillMode") == "mixed"
    assert one(service, "KillSignal") == "SIGTERM"
    assert int(one(service, "TimeoutStopSec")) >= 60
    assert one(service, "EnvironmentFile") == ETC_ENV
    assert service["Environment"] == [f"TURBOBOT_CONFIG={ETC_CONFIG}"]
    assert one(service, "WorkingDirectory") == SRV and one(service, "User") == "turbobot"
    assert one(service, "Restart") == "on-failure"
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verify() -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed: the units are not checked by systemd itself")
    for path in UNITS.values():
        done = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=120)
        program = shlex.split(one(unit(path)["Service"], "ExecStart"))[0]
        # The program is not installed here; any other remark (an unknown key, a bad value) fails.
        remarks = [line for line in (done.stdout + done.stderr).splitlines()
                   if line.strip() and f"Command {program} is not executable" not in line]
        assert not remarks, "\n".join(remarks)


# ---------------------------------------------------------------------------------------- smoke test
@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in deploy/config.toml"
    return text.replace(old, new)


def host_config(host_dir: Path, db_url: str, endpoint: str, web_port: int) -> Path:
    """deploy/config.toml for one host of the smoke test: the test's servers instead of `db` and `minio`, the
    host's own folder instead of /srv/turbobot, the console on a free loopback port. Everything else as is."""
    text = CONFIG.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    text = _replace(text, f'url = "{data["database"]["url"]}"', f'url = "{db_url}"')
    text = _replace(text, f'endpoint_url = "{data["store"]["endpoint_url"]}"', f'endpoint_url = "{endpoint}"')
    text = _replace(text, f'host = "{data["web"]["host"]}"', 'host = "127.0.0.1"')
    text = _replace(text, f"port = {data['web']['port']}\n", f"port = {web_port}\n")
    text = _replace(text, f'"{SRV}/', f'"{host_dir}/')
    host_dir.mkdir(parents=True, exist_ok=True)
    path = host_dir / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Host:
    """One systemd unit's ExecStart run as a process, with the unit's environment and working directory."""

    def __init__(self, role: str, host_dir: Path, config: Path, extra_env: dict[str, str],
                 rewrite: Callable[[list[str]], list[str]] = lambda argv: argv) -> None:
        service = unit(UNITS[role])["Service"]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TURBOBOT_") and k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "PGPASSWORD")}
        assert one(service, "EnvironmentFile") == ETC_ENV  # the host's copy of env.example
        env.update(env_example())
        for assignment in service.get("Environment", []):
            key, value = assignment.split("=", 1)
            env[key] = str(config) if value == ETC_CONFIG else value
        env.update(extra_env, PYTHONPATH=str(ROOT))
        argv = rewrite(shlex.split(one(service, "ExecStart")))
        turbobot_args(argv)
        self.role = role
        self.argv = [sys.executable, "-m", "turbobot.cli", *argv[1:]]
        self.log_path = host_dir / f"{role}.log"
        cwd = Path(one(service, "WorkingDirectory").replace(SRV, str(host_dir), 1))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> None:
        assert self.proc.poll() is None, f"{self.role} exited with {self.proc.returncode}:\n{self.log}"

    def children(self) -> set[int]:
        """Pids of this process's children (its worker processes), from /proc."""
        out = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid:
                out.add(int(stat.parent.name))
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def wait_for(predicate: Callable[[], Any], limit: float, what: str, hosts: tuple[Host, ...] = ()) -> Any:
    """Poll ``predicate`` until it returns something true (returned), failing after ``limit`` s or as soon as a
    host process exits."""
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if result:
            return result
        for h in hosts:
            h.alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(0.1)


def http(url: str, token: str | None = None, data: dict[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.postgres
@pytest.mark.slow
def test_smoke_the_units_run_a_bot_host_and_a_worker_host(
    tmp_path: Path, pg_url: str, s3: MotoServer, base_mp4: Path
) -> None:
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'turbobot[s3]')")
    env = env_example()
    token = env["TURBOBOT_ADMIN_TOKEN"]
    port = free_port()
    configs = {role: host_config(tmp_path / role, pg_url, s3.url, port) for role in UNITS}
    settings = {role: load_settings(path) for role, path in configs.items()}
    assert settings["bot"].database.url == pg_url and settings["bot"].store.endpoint_url == s3.url
    store = settings["bot"].store
    s3.make_bucket(store.bucket)  # what compose.yaml's `bucket` service does

    # compose.yaml's one-shot `migrate` service, on the bot host's config.
    migrate = compose_file()["services"]["migrate"]["command"]
    turbobot_args(migrate)
    done = subprocess.run([sys.executable, "-m", "turbobot.cli", *migrate[1:]], cwd=tmp_path / "bot",
                          env={**os.environ, **env, "TURBOBOT_CONFIG": str(configs["bot"]), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr

    def cpu_devices(argv: list[str]) -> list[str]:  # the worker unit's --devices, on this GPU-less machine
        i = argv.index("--devices")
        return [*argv[: i + 1], "cpu", *argv[i + 2:]]

    test_engine = {"TURBOBOT_ENGINE_FACTORY": ENGINE_SPEC, "TURBOBOT_TEST_MP4": str(base_mp4)}
    hosts: list[Host] = []
    try:
        hosts.append(bot := Host("bot", tmp_path / "bot", configs["bot"], {}))
        hosts.append(worker := Host("worker", tmp_path / "worker", configs["worker"], test_engine, cpu_devices))
        base = f"http://127.0.0.1:{port}"
        # The bot host is ready once it sees a fresh worker of the worker host (through the database).
        wait_for(lambda: http(base + "/readyz")[0] == 200, 120, "the bot host's /readyz", (bot, worker))

        status, body = http(base + "/api/jobs", token, {"mode": "t2v", "prompt": "deploy smoke test",
                                                        "frames": "5", "steps": "2"})
        assert status == 201, body
        job_id = json.loads(body)["job"]["id"]

        def finished() -> dict[str, Any] | None:
            status, body = http(f"{base}/api/jobs/{job_id}", token)
            job = json.loads(body)["job"] if status == 200 else None
            return job if job and job["terminal"] else None

        job = wait_for(finished, 120, f"job {job_id} to finish", (bot, worker))
        assert job["state"] == "succeeded", job
        client = boto3.client("s3", endpoint_url=s3.url, region_name=store.region,
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        listed = client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}outputs/").get("Contents", [])
        videos = [o["Key"] for o in listed if o["Key"].endswith(".mp4")]
        assert len(videos) == 1, listed
        video = client.get_object(Bucket=store.bucket, Key=videos[0])["Body"].read()
        assert hashlib.sha256(video).hexdigest() == job["output"]["sha256"]
        status, served = http(base + job["output"]["url"], token)  # the bot host fetches it from the store
        assert status == 200 and served == video
        assert not list((tmp_path / "worker").rglob("*.mp4"))  # the worker host kept no copy

        # systemd's KillMode=mixed: SIGTERM to each main process only; it stops its own workers and exits 0.
        workers = worker.children()
        assert workers, "the worker host runs no worker process"
        for h in hosts:
            h.proc.send_signal(signal.SIGTERM)
        for h in hosts:
            try:
                rc = h.proc.wait(90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{h.role} did not stop within 90 s of SIGTERM:\n{h.log}") from None
            assert rc == 0, f"{h.role} exited with {rc}:\n{h.log}"
        wait_for(lambda: not any(running(pid) for pid in workers), 30, "the worker processes to exit")
        for h in hosts:
            assert "Traceback" not in h.log, h.log
    finally:
        for h in hosts:
            h.kill()
