"""Console and scheduler hardening: one list of refusal codes (text, HTTP status, metric label), unusable
storage (full disk, outputs folder not a folder) keeps jobs queued and refuses new ones clearly, job ids out
of range answer 404 JSON, slow or vanishing clients against the real server, and the pixel-bomb message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from scheduler_support import ENGINE_SPEC, until
from test_web_http import bomb_png
from web_support import console, console_settings, make_db, mp4_env, png_bytes, set_worker

from bots.texts import REFUSAL_TEXTS, refusal_text
from bots.web import create_web_app
from bots.web.app import start_web
from bots.web.context import OPERATOR
from bots.web.security import CSRF_COOKIE, CSRF_HEADER
from generator.scheduler.api import Refusal, RefusalCode
from generator.scheduler.disk import STORAGE_MESSAGE, storage_problem
from generator.scheduler.metrics import REFUSAL_LABELS, refusal_label
from generator.scheduler.service import Scheduler
from storage.db import Database
from turbobot.config import Settings

ROOT = Path(__file__).resolve().parent.parent
HUGE = str(2**64 + 5)  # beyond a signed 64-bit id: used to crash the handlers with OverflowError


# --- item: refusal codes are one enumeration -----------------------------------------------------------


def test_every_refusal_code_maps_to_a_text_a_status_and_a_metric_label() -> None:
    for code in RefusalCode:
        assert REFUSAL_TEXTS[code].strip(), code
        assert refusal_text(Refusal(code, "")) == REFUSAL_TEXTS[code]
        assert 400 <= code.http_status < 600, code
        assert code.metric_label in REFUSAL_LABELS and refusal_label(code.value) == code.metric_label
    assert RefusalCode.ENGINE_UNAVAILABLE.http_status == 503
    assert RefusalCode.STORAGE_UNAVAILABLE.http_status == 503
    assert refusal_label("made_up") == "other"
    with pytest.raises(ValueError):
        Refusal("made_up", "x")  # an unlisted code fails where it is raised, not in a front end
    # Every code raised anywhere in the code base is one of the enumeration.
    used: set[str] = set()
    for path in [*ROOT.joinpath("bots").rglob("*.py"), *ROOT.joinpath("generator").rglob("*.py")]:
        used.update(re.findall(r'Refusal\(\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
        used.update(m.lower() for m in re.findall(r"RefusalCode\.([A-Z_]+)", path.read_text(encoding="utf-8")))
    assert used and used <= {c.value for c in RefusalCode}, used - {c.value for c in RefusalCode}


async def test_metrics_list_every_refusal_reason(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        text = await (await c.client.get("/metrics")).text()
    for code in RefusalCode:
        assert f'turbobot_refusals_total{{reason="{code.metric_label}"}}' in text, code


async def test_engine_down_answers_503_and_is_counted(tmp_path: Path) -> None:
    broken = ENGINE_SPEC.replace(":make_engine", ":broken_engine")
    async with console(tmp_path, workers=True, engine_factory=broken) as c:
        await c.prime()
        await until(lambda: bool(c.scheduler.views.worker_errors()), 60, "the worker to report its load failure")
        resp = await c.submit("a fox", frames=5)
        body = await resp.json()
        assert resp.status == 503, body  # was 400: the console's status table lacked this code
        assert body["error"] == "engine_unavailable" and "not available" in body["message"]
        text = await (await c.client.get("/metrics")).text()
        assert 'turbobot_refusals_total{reason="engine_unavailable"} 1.0' in text  # was counted as "other"
        assert 'turbobot_web_rejections_total{reason="engine_unavailable"} 1.0' in text


# --- item: unusable storage ----------------------------------------------------------------------------


def test_storage_problem_names_the_reason(tmp_path: Path) -> None:
    good = tmp_path / "outputs"
    assert storage_problem([good], 0) == "" and good.is_dir()
    not_dir = tmp_path / "file"
    not_dir.write_bytes(b"x")
    assert "is not a folder" in storage_problem([good, not_dir], 0)
    assert "cannot be created" in storage_problem([not_dir / "sub"], 0)
    free = shutil.disk_usage(tmp_path).free
    assert "free; at least" in storage_problem([good], free * 4 + (1 << 40))
    assert not [p for p in good.iterdir()]  # the write probe leaves nothing behind


async def test_full_disk_refuses_jobs_and_uploads_in_json(tmp_path: Path) -> None:
    # "Full": more free space required than any test disk has (root ignores chmod, so no read-only dirs).
    async with console(tmp_path, app={"min_free_bytes": 2**62}) as c:
        await set_worker(c.db, state="idle")
        await c.prime()
        resp = await c.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503 and body["worker"]["ok"] is True and body["database"]["ok"] is True
        assert body["storage"]["ok"] is False and "app.min_free_bytes" in body["storage"]["reason"]
        overview = await (await c.client.get("/api/admin/overview")).json()
        assert overview["storage"]["ok"] is False and "free" in overview["storage"]["reason"]

        resp = await c.submit("a fox", frames=5)
        assert resp.status == 503 and resp.content_type == "application/json"
        body = await resp.json()
        assert body["error"] == "storage_unavailable" and body["message"] == STORAGE_MESSAGE
        resp = await c.submit("a fox", mode="i2v", image=png_bytes(64, 64), frames=5)
        assert resp.status == 503 and (await resp.json())["error"] == "storage_unavailable"

        # The refusals cost no quota and left no job or input behind.
        queue = await (await c.client.get("/api/queue")).json()
        assert queue["jobs"] == [] and queue["quota"]["jobs_today"] == 0
        assert not list((tmp_path / "inputs").glob("*.png"))
        # Other front ends go through the scheduler: the same refusal.
        with pytest.raises(Refusal) as info:
            await c.scheduler.jobs.save_input(OPERATOR, png_bytes(), 64, 48)
        assert info.value.code == RefusalCode.STORAGE_UNAVAILABLE


async def test_outputs_folder_unusable_keeps_jobs_queued_until_fixed(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    async with console(tmp_path) as c:
        await c.prime()
        resp = await c.submit("a fox waiting for a disk", frames=5, steps=1)
        assert resp.status == 201, await resp.text()
        job_id = (await resp.json())["job"]["id"]
        # The outputs folder is replaced by a file (as root, chmod would not stop writes).
        shutil.rmtree(outputs)
        outputs.write_bytes(b"not a folder")
        body = await (await c.client.get("/readyz")).json()
        assert body["storage"]["ok"] is False and "is not a folder" in body["storage"]["reason"]
        resp = await c.submit("another fox", frames=5)
        assert resp.status == 503 and (await resp.json())["error"] == "storage_unavailable"

    # Workers start while the folder is unusable: the service starts, the job is not claimed.
    env = mp4_env(tmp_path / "mp4")
    async with console(tmp_path, workers=True, worker_env=env) as c:
        async def worker_reports_storage() -> bool:
            overview = await (await c.client.get("/api/admin/overview")).json()
            return any("is not a folder" in (w["info"] or {}).get("storage_error", "") for w in overview["workers"])

        await until(worker_reports_storage, 60, "the worker to report the unusable outputs folder")
        assert (await c.job(job_id))["job"]["state"] == "queued"
        resp = await c.client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["worker"]["ok"] is True

        outputs.unlink()
        outputs.mkdir()  # fixed: the worker resumes by itself
        done = await c.wait_state(job_id, ("succeeded", "failed"), limit=60)
        assert done["state"] == "succeeded", done
        assert (await c.client.get("/readyz")).status == 200


# --- item: pixel bomb names the declared size ---------------------------------------------------------


async def test_pixel_bomb_refusal_names_the_declared_size(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        resp = await c.submit("a fox", mode="i2v", image=bomb_png(30000, 30000), frames=5)
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "bad_image", body
        assert "too large (30000x30000 pixels)" in body["message"], body["message"]


# --- item: job ids out of range, slow and vanishing clients --------------------------------------------


async def test_out_of_range_and_malformed_job_ids_answer_404_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        for bad in (HUGE, "9223372036854775808", "0", "00000000000000000000000000001x"):
            for method, path in (
                ("GET", f"/api/jobs/{bad}"), ("GET", f"/api/jobs/{bad}/events"),
                ("GET", f"/media/jobs/{bad}/video.mp4"), ("GET", f"/media/jobs/{bad}/input.png"),
                ("POST", f"/api/jobs/{bad}/cancel"), ("POST", f"/api/jobs/{bad}/remix"),
                ("POST", f"/api/jobs/{bad}/retry"), ("POST", f"/api/jobs/{bad}/delete"),
            ):
                resp = await c.client.request(method, path, json={}, headers=c.headers())
                assert resp.status == 404, (method, path, resp.status, await resp.text())
                assert resp.content_type == "application/json", (method, path)
                assert (await resp.json())["error"] == "not_found"
        # The largest valid id is just a job that does not exist.
        resp = await c.client.get("/api/jobs/9223372036854775807")
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        resp = await c.client.get(f"/api/jobs?before={HUGE}")
        assert resp.status == 400 and (await resp.json())["error"] == "invalid"
        resp = await c.client.get("/api/nothing-here")
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "bots")) and r.exc_info]
    assert not [r for r in caplog.records if "Overflow" in r.getMessage()]


@dataclass
class Served:
    settings: Settings
    db: Database
    scheduler: Scheduler
    port: int


@contextlib.asynccontextmanager
async def served(tmp: Path, **web: float) -> AsyncIterator[Served]:
    """The console on the real server runner (the one ``turbobot run`` uses) on 127.0.0.1."""
    settings = console_settings(tmp, web=dict(web))
    db = await make_db(settings)
    scheduler = Scheduler(settings, db=db)
    await scheduler.start(run_workers=False)
    runner, url = await start_web(create_web_app(settings, scheduler), "127.0.0.1", 0, settings.web)
    try:
        yield Served(settings, db, scheduler, int(url.rsplit(":", 1)[1]))
    finally:
        await runner.cleanup()
        await scheduler.stop()
        await db.dispose()


async def csrf_token(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
        assert resp.status == 200
        return resp.cookies[CSRF_COOKIE].value


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open past ``limit``."""
    data = b""
    async with asyncio.timeout(limit):
        while chunk := await reader.read(4096):
            data += chunk
    return data


def upload_head(port: int, token: str, boundary: str, length: int) -> bytes:
    return (
        f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Cookie: {CSRF_COOKIE}={token}\r\n{CSRF_HEADER}: {token}\r\n\r\n"
    ).encode()


def image_part(boundary: str) -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\ni2v\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes(64, 64)[:40]


async def test_slow_clients_are_cut(tmp_path: Path) -> None:
    limits = {"header_timeout_seconds": 0.5, "body_timeout_seconds": 0.5, "keepalive_timeout_seconds": 0.5}
    async with served(tmp_path, **limits) as s:
        # Connects and sends nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        t0 = time.monotonic()
        assert await read_until_closed(reader, 5) == b""
        assert time.monotonic() - t0 < 4
        writer.close()

        # Trickles its headers a byte at a time, faster than any idle timeout would notice.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)

        async def trickle() -> None:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            with contextlib.suppress(ConnectionError):
                for _ in range(200):
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(trickle())
        t0 = time.monotonic()
        try:
            assert await read_until_closed(reader, 5) == b""
            assert time.monotonic() - t0 < 4
        finally:
            task.cancel()
            writer.close()

        # A multipart upload that stalls after its first bytes: 408 JSON, then the connection is closed.
        token = await csrf_token(s.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(upload_head(s.port, token, "tbslow", 100_000) + image_part("tbslow"))
        await writer.drain()
        t0 = time.monotonic()
        answer = await read_until_closed(reader, 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"error": "timeout"' in answer and time.monotonic() - t0 < 4
        writer.close()

        # An idle kept-alive connection is closed after its request was answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        t0 = time.monotonic()
        answer = await read_until_closed(reader, 5)
        assert answer.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 4
        writer.close()

        # A well-behaved client is unaffected.
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{s.port}/api/options") as resp:
            assert resp.status == 200


async def test_client_gone_mid_upload_is_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with served(tmp_path) as s:
        token = await csrf_token(s.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        head = upload_head(s.port, token, "tbgone", 100_000).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):  # the server is handling the request now
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        writer.write(image_part("tbgone"))
        await writer.drain()
        writer.transport.abort()  # the browser tab is closed mid-upload

        def logged() -> bool:
            return any("disconnected" in r.getMessage() for r in caplog.records)

        await until(logged, 10, "the disconnect to be logged")
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    # No traceback from the server or the console for it (the database pool may log its own shutdown noise).
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith(("aiohttp", "bots"))]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
