"""Web console over HTTP (no worker processes): health, readiness, auth and bind rules, CSRF, path safety,
uploads checked while they stream, playground submission, gallery filters, admin actions."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import struct
import time
import zlib
from pathlib import Path

import pytest
from sqlalchemy import update
from web_support import OPERATOR, TOKEN, TOKEN_ENV, console, console_settings, make_db, png_bytes, set_worker

from bots.web import WebConfigError, create_web_app
from bots.web.security import CSRF_HEADER, is_loopback_host
from generator.params import PARAM, PARAMS
from generator.request import GenerationRequest
from generator.scheduler.api import DeliveryTarget, Requester
from storage.models import Output, User
from storage.repo_files import add_output


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


# --- health and readiness -------------------------------------------------------------------------


async def test_healthz_and_readyz_follow_worker_heartbeat(tmp_path: Path) -> None:
    async with console(tmp_path, scheduler={"watchdog_seconds": 5.0, "heartbeat_seconds": 0.1}) as c:
        resp = await c.client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["ok"] is True

        resp = await c.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503
        assert body["worker"]["ok"] is False and body["worker"]["reason"] == "no worker has started"
        assert body["database"]["ok"] is True

        await set_worker(c.db, state="starting")  # still loading its model: not serving yet
        assert (await c.client.get("/readyz")).status == 503

        await set_worker(c.db, state="idle")
        resp = await c.client.get("/readyz")
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["ready"] is True

        await set_worker(c.db, state="idle", age_s=6.0)  # heartbeat older than the watchdog limit
        resp = await c.client.get("/readyz")
        assert resp.status == 503
        assert "recent heartbeat" in (await resp.json())["worker"]["reason"]


async def test_readyz_is_503_when_the_database_cannot_be_written(tmp_path: Path) -> None:
    async with console(tmp_path, database={"busy_timeout_ms": 100}) as c:
        await set_worker(c.db, state="idle")
        assert (await c.client.get("/readyz")).status == 200
        # Another process holds the write lock: our write probe must fail (not hang), so /readyz says 503.
        db_file = str(tmp_path / "turbobot.db")
        other = sqlite3.connect(db_file, timeout=0.1, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            t0 = time.monotonic()
            resp = await c.client.get("/readyz")
            body = await resp.json()
            assert resp.status == 503, body
            assert body["worker"]["ok"] is True and body["database"]["ok"] is False
            assert time.monotonic() - t0 < 5
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await c.client.get("/readyz")).status == 200


# --- binding and auth -----------------------------------------------------------------------------


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3", "app.localhost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "", "::", "192.168.1.5", "example.com", "10.0.0.1"):
        assert not is_loopback_host(host), host


async def test_public_bind_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.scheduler.service import Scheduler

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV + "_FILE", raising=False)
    settings = console_settings(tmp_path, web={"host": "0.0.0.0"})
    db = await make_db(settings)
    scheduler = Scheduler(settings, db=db)
    try:
        with pytest.raises(WebConfigError) as err:
            create_web_app(settings, scheduler)
        assert TOKEN_ENV in str(err.value) and "0.0.0.0" in str(err.value)

        monkeypatch.setenv(TOKEN_ENV, "short")
        with pytest.raises(WebConfigError, match="too short"):
            create_web_app(settings, scheduler)

        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        create_web_app(settings, scheduler)  # allowed now

        monkeypatch.delenv(TOKEN_ENV)
        token_file = tmp_path / "token.txt"
        token_file.write_text(TOKEN + "\n")
        monkeypatch.setenv(TOKEN_ENV + "_FILE", str(token_file))
        create_web_app(settings, scheduler)  # the token may come from a file named by NAME_FILE
    finally:
        await db.dispose()


async def test_token_gates_every_page_and_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    async with console(tmp_path) as c:
        for path in ("/healthz", "/metrics", "/login", "/static/style.css"):
            assert (await c.client.get(path)).status in (200, 503), path
        resp = await c.client.get("/admin", allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/login?next=/admin"
        resp = await c.client.get("/admin/moderation", allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/login?next=/admin/moderation"
        for path in ("/api/admin/overview", "/api/jobs", "/media/jobs/1/video.mp4"):
            assert (await c.client.get(path)).status == 401, path

        await c.client.get("/login")  # CSRF cookie
        resp = await c.post_json("/login", {"token": "wrong-token-wrong-token"})
        assert resp.status == 401
        assert (await c.client.get("/api/admin/overview")).status == 401

        resp = await c.post_json("/login", {"token": TOKEN})
        assert resp.status == 200
        assert (await c.client.get("/api/admin/overview")).status == 200
        assert (await c.client.get("/admin")).status == 200

        await c.post_json("/logout")
        assert (await c.client.get("/api/admin/overview")).status == 401

        # Scripts and scrapers may use the bearer header instead (no cookie, no CSRF token needed).
        c.client.session.cookie_jar.clear()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await c.client.get("/api/admin/overview", headers=bearer)).status == 200
        resp = await c.client.post("/api/jobs", data={"mode": "t2v", "prompt": "a fox", "frames": "5"}, headers=bearer)
        assert resp.status == 201, await resp.text()
        resp = await c.client.get("/api/admin/overview", headers={"Authorization": "Bearer nope"})
        assert resp.status == 401


async def test_without_a_token_only_local_host_names_are_answered(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        assert (await c.client.get("/api/options")).status == 200
        # A DNS-rebinding page reaches 127.0.0.1 with its own host name in the Host header.
        resp = await c.client.get("/api/options", headers={"Host": "evil.example:8080"})
        assert resp.status == 421
        resp = await c.client.get("/api/options", headers={"Host": "localhost:8080"})
        assert resp.status == 200


# --- CSRF -------------------------------------------------------------------------------------------


async def test_state_changing_requests_need_the_csrf_token(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        form = {"mode": "t2v", "prompt": "a fox", "frames": "5"}
        resp = await c.client.post("/api/jobs", data=form)  # no cookie, no header
        assert resp.status == 403 and (await resp.json())["error"] == "csrf"
        token = await c.prime()
        resp = await c.client.post("/api/jobs", data=form)  # cookie only (what a cross-site form sends)
        assert resp.status == 403
        resp = await c.client.post("/api/jobs", data=form, headers={CSRF_HEADER: "x" + token})
        assert resp.status == 403
        resp = await c.client.post(
            "/api/jobs", data=form, headers={CSRF_HEADER: token, "Origin": "http://evil.example"}
        )
        assert resp.status == 403 and "Origin" in (await resp.json())["message"]
        for path in ("/api/jobs/1/cancel", "/api/admin/users/block", "/login", "/logout"):
            assert (await c.client.post(path, json={})).status == 403, path
        assert (await c.client.get("/api/jobs")).status == 200  # reads need no token

        resp = await c.client.post("/api/jobs", data=form, headers={CSRF_HEADER: token, "Origin": c.base})
        assert resp.status == 201, await resp.text()
        page = await c.client.get("/")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"


# --- files by job id only -----------------------------------------------------------------------


async def test_files_are_served_by_job_id_only(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        secret = tmp_path / "secret.txt"
        secret.write_text("not for you")
        for path in (
            "/media/jobs/../../secret.txt", "/media/jobs/%2e%2e/%2e%2e/secret.txt", "/media/jobs/abc/video.mp4",
            "/media/secret.txt", "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
            "/media/jobs/999/video.mp4",
        ):
            resp = await c.client.get(path)
            assert resp.status in (403, 404), (path, resp.status)
            assert "not for you" not in await resp.text()

        resp = await c.submit("a fox", frames=5)
        job_id = (await resp.json())["job"]["id"]
        assert (await c.client.get(f"/media/jobs/{job_id}/video.mp4")).status == 404  # not rendered yet

        # Even a row pointing outside the outputs folder is never served.
        async with c.db.write() as s:
            await add_output(
                s, job_id=job_id, path=str(secret), sha256="0" * 64, size=11, duration_s=1.0, width=64,
                height=64, frames=5, fps=16, model_label="x", is_demo=True, now=dt.datetime.now(dt.UTC),
            )
        assert (await c.client.get(f"/media/jobs/{job_id}/video.mp4")).status == 404

        video = Path(c.settings.app.outputs_dir) / f"job-{job_id}.mp4"  # the scheduler made the folder
        await asyncio.to_thread(video.write_bytes, bytes(range(256)) * 40)
        async with c.db.write() as s:
            await s.execute(update(Output).where(Output.job_id == job_id).values(path=str(video)))
        resp = await c.client.get(f"/media/jobs/{job_id}/video.mp4", headers={"Range": "bytes=100-199"})
        assert resp.status == 206
        assert resp.headers["Content-Type"] == "video/mp4"
        assert resp.headers["Content-Range"] == f"bytes 100-199/{256 * 40}"
        assert await resp.read() == (bytes(range(256)) * 40)[100:200]


# --- uploads --------------------------------------------------------------------------------------


SMALL_LIMITS = {"max_image_bytes": 300_000, "max_image_pixels": 1_000_000, "max_image_side": 2048}


async def test_image_upload_is_checked_and_stored(tmp_path: Path) -> None:
    async with console(tmp_path, limits=SMALL_LIMITS) as c:
        await c.prime()
        image = png_bytes(96, 64)
        resp = await c.submit("", mode="i2v", image=image, frames=5)
        body = await resp.json()
        assert resp.status == 201, body
        job = body["job"]
        assert job["mode"] == "i2v" and job["input_url"] == f"/media/jobs/{job['id']}/input.png"
        assert job["prompt"] == c.settings.defaults.i2v_prompt  # empty i2v prompt -> configured default
        served = await c.client.get(job["input_url"])
        assert served.status == 200 and served.headers["Content-Type"] == "image/png"
        assert (await served.read()).startswith(b"\x89PNG")

        resp = await c.submit("a fox", mode="i2v", frames=5)  # no image
        assert resp.status == 400 and "needs an image" in (await resp.json())["message"]
        resp = await c.submit("a fox", mode="t2v", image=image, frames=5)
        assert resp.status == 400 and "takes no image" in (await resp.json())["message"]
        resp = await c.submit("a fox", mode="i2v", image=b"GIF89a not really", frames=5)
        assert resp.status == 400 and "PNG, JPEG or WebP" in (await resp.json())["message"]
        resp = await c.submit("a fox", mode="i2v", image=png_bytes(1100, 1000), frames=5)
        assert resp.status == 400 and "too large" in (await resp.json())["message"]


async def test_oversized_upload_is_refused_while_streaming(tmp_path: Path) -> None:
    async with console(tmp_path, limits=SMALL_LIMITS) as c:
        await c.prime()
        # Declared too big: refused from Content-Length alone.
        resp = await c.submit("a fox", mode="i2v", image=b"\x89PNG\r\n\x1a\n" + b"\0" * 700_000, frames=5)
        assert resp.status == 413 and "limit is" in (await resp.json())["message"]

        # Chunked (no Content-Length): counted while it streams.
        boundary = "tbtestboundary"

        async def body() -> object:
            yield (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\ni2v\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n"
            ).encode() + png_bytes(32, 32)[:33]
            for _ in range(40):
                yield b"\0" * 16384
            yield f"\r\n--{boundary}--\r\n".encode()

        resp = await c.client.post(
            "/api/jobs", data=body(), headers=c.headers(**{"Content-Type": f"multipart/form-data; boundary={boundary}"})
        )
        assert resp.status == 413, await resp.text()


async def raw_request_first_response(port: int, head: bytes, first_body: bytes) -> bytes:
    """Send the head and only the first part of a chunked body, then read what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + f"{len(first_body):x}\r\n".encode() + first_body + b"\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), timeout=5)
    finally:
        writer.close()


async def test_pixel_bomb_is_refused_before_the_rest_arrives(tmp_path: Path) -> None:
    async with console(tmp_path, limits=SMALL_LIMITS) as c:
        token = await c.prime()
        boundary = "tbbomb"
        part = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\ni2v\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode() + bomb_png(30000, 30000) + b"\0" * 100_000  # the start of a huge upload
        port = c.client.port
        head = (
            f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Cookie: turbobot_csrf={token}\r\n{CSRF_HEADER}: {token}\r\n\r\n"
        ).encode()
        t0 = time.monotonic()
        assert port is not None
        answer = await raw_request_first_response(port, head, part)  # the rest is never sent
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"too large" in answer
        assert time.monotonic() - t0 < 2


# --- playground submission and job API -----------------------------------------------------------


async def test_playground_submit_makes_a_job(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        options = await (await c.client.get("/api/options")).json()
        fields = {f["name"]: f for f in options["params"]}  # the form, from generator.params
        assert fields["aspect"]["choices"] == ["16:9", "9:16", "1:1", "4:3", "3:4"]
        assert {k: fields["frames"][k] for k in ("min", "max", "step", "default")} == {"min": 5, "max": 81, "step": 4, "default": 81}
        assert fields["sampler"]["choices"] == ["sde", "ode"] and fields["model"]["choices"]["t2v"] == ["tiny-t2v"]

        resp = await c.submit(
            "a red fox running", client_key="key-0123456789", seed=42, steps=2, frames=9, aspect="1:1",
            resolution="480p", sampler="ode", sla_topk="0.15", attention="dense",
        )
        body = await resp.json()
        assert resp.status == 201, body
        job = body["job"]
        assert job["state"] == "queued" and job["seed"] == 42 and job["platform"] == "web"
        assert job["user"]["key"] == OPERATOR
        p = job["params"]
        assert (p["steps"], p["frames"], p["aspect"], p["sampler"], p["sla_topk"], p["attention"]) == (
            2, 9, "1:1", "ode", 0.15, "dense",
        )
        assert (p["width"], p["height"]) == (640, 640)
        # The scripts take parameter names and labels from here (the declaration), never their own list.
        fields = {f["name"]: f for f in job["fields"]}
        assert list(fields) == [q.name for q in PARAMS if "t2v" in q.modes]
        assert fields["sla_topk"]["label"] == PARAM["sla_topk"].label and fields["sla_topk"]["shown"] == "0.15"
        assert [f for f in fields if fields[f]["identity"]] == [q.name for q in PARAMS if q.identity]
        assert job["position"] == 1 and "Position in queue: #1" in job["status_text"]

        # The scheduler stored exactly this job.
        view = await c.scheduler.views.get(job["id"])
        assert view is not None and view.request.seed == 42 and view.requester == Requester("web", "operator", "Console operator")

        # Same client key (a double click) -> the same job.
        again = await c.submit("a red fox running", client_key="key-0123456789", seed=42, steps=2, frames=9)
        again_body = await again.json()
        assert again.status == 200 and again_body["duplicate"] is True and again_body["job"]["id"] == job["id"]

        # Inline flags in the prompt work as in the chats; no seed -> one is chosen and shown.
        resp = await c.submit("a cat --steps 1 --ar 9:16", frames=5)
        body = await resp.json()
        assert resp.status == 201, body
        assert body["job"]["params"]["steps"] == 1 and body["job"]["params"]["aspect"] == "9:16"
        assert body["job"]["prompt"] == "a cat" and body["job"]["seed"] > 0

        for fields, needle in (
            ({"frames": 6}, "Frames must be 1 more than a multiple of 4"),
            ({"frames": "many"}, "Frames must be a whole number"),
            ({"steps": 9}, "Steps must be from 1 to 4"),
            ({"aspect": "2:1"}, "Aspect ratio must be one of"),
            ({"nonsense": 1}, "Unknown option"),
            ({"sla_topk": "nan"}, "SLA top-k must be a number"),
        ):
            resp = await c.submit("a fox", **fields)
            assert resp.status == 400, fields
            assert needle in (await resp.json())["message"], fields
        resp = await c.submit("   ")
        assert resp.status == 400 and "prompt is empty" in (await resp.json())["message"]


async def test_scheduler_refusals_reach_the_page_and_the_metrics(tmp_path: Path) -> None:
    async with console(tmp_path, admin={"blocked_words": ["forbiddenword"]}) as c:
        await c.prime()
        resp = await c.submit("a forbiddenword fox", frames=5)
        assert resp.status == 400
        assert (await resp.json())["error"] == "blocked_words"
        text = await (await c.client.get("/metrics")).text()
        assert 'turbobot_refusals_total{reason="blocked_words"} 1.0' in text
        assert 'turbobot_web_rejections_total{reason="blocked_words"} 1.0' in text
        assert "operator" not in text  # no user ids as labels


async def test_gallery_filters_and_lineage(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        tg = Requester("telegram", "4242", "Tanya")
        tg_target = DeliveryTarget(platform="telegram", chat_id="4242")
        first = await c.scheduler.jobs.submit(
            GenerationRequest(mode="t2v", prompt="a blue whale", frames=5, steps=1), tg, tg_target, "tg:1"
        )
        resp = await c.submit("a red fox", frames=5)
        web_job = (await resp.json())["job"]

        jobs = (await (await c.client.get("/api/jobs")).json())["jobs"]
        assert [j["id"] for j in jobs] == [web_job["id"], first.job.id]  # newest first, every platform
        page1 = await (await c.client.get("/api/jobs", params={"limit": "1"})).json()
        assert [j["id"] for j in page1["jobs"]] == [web_job["id"]] and page1["next_before"] == web_job["id"]
        page2 = await (await c.client.get("/api/jobs", params={"limit": "1", "before": str(web_job["id"])})).json()
        assert [j["id"] for j in page2["jobs"]] == [first.job.id]
        only_tg = (await (await c.client.get("/api/jobs", params={"user": "telegram:4242"})).json())["jobs"]
        assert [j["id"] for j in only_tg] == [first.job.id]
        by_name = (await (await c.client.get("/api/jobs", params={"user": "tany"})).json())["jobs"]
        assert [j["id"] for j in by_name] == [first.job.id]
        by_platform = (await (await c.client.get("/api/jobs", params={"platform": "web"})).json())["jobs"]
        assert [j["id"] for j in by_platform] == [web_job["id"]]
        by_prompt = (await (await c.client.get("/api/jobs", params={"q": "whale"})).json())["jobs"]
        assert [j["id"] for j in by_prompt] == [first.job.id]
        assert (await (await c.client.get("/api/jobs", params={"mode": "i2v"})).json())["jobs"] == []
        assert (await c.client.get("/api/jobs", params={"state": "bogus"})).status == 400

        # The operator remixes the Telegram job: lineage is visible from both sides.
        resp = await c.post_json(f"/api/jobs/{first.job.id}/remix", {"prompt": "a blue whale at night", "options": {"steps": "2"}})
        body = await resp.json()
        assert resp.status == 201, body
        child = body["job"]
        assert child["parent_id"] == first.job.id and child["seed"] == first.job.seed
        assert child["prompt"] == "a blue whale at night" and child["params"]["steps"] == 2
        assert child["user"]["key"] == OPERATOR
        parent_page = await c.job(first.job.id)
        assert [ch["id"] for ch in parent_page["children"]] == [child["id"]] and parent_page["parent"] is None
        child_page = await c.job(child["id"])
        assert child_page["parent"]["id"] == first.job.id

        resp = await c.post_json(f"/api/jobs/{first.job.id}/retry", {"client_key": "retry-key-123"})
        retry = (await resp.json())["job"]
        assert resp.status == 201 and retry["parent_id"] == first.job.id
        assert retry["prompt"] == "a blue whale"
        # Retry picks a fresh seed (1 in 2**31 to collide)
        assert retry["seed"] != first.job.seed

        queued = (await (await c.client.get("/api/jobs", params={"state": "queued"})).json())["jobs"]
        assert len(queued) == 4
        # Listings never expose delivery extras (Discord interaction tokens) or server paths.
        assert all("target" not in j and "delivery" not in j and "extra" not in j["params"] for j in jobs)


async def test_admin_cancel_limits_and_block(tmp_path: Path) -> None:
    async with console(tmp_path) as c:
        await c.prime()
        await set_worker(c.db, state="idle", info={"model": "tiny", "attention": "sla", "gpu_memory_gb": 1.5})
        tg = Requester("telegram", "77", "Tim")
        target = DeliveryTarget(platform="telegram", chat_id="77")
        jobs = [
            (await c.scheduler.jobs.submit(GenerationRequest(mode="t2v", prompt=f"fox {i}", frames=5), tg, target, f"k{i}")).job
            for i in range(2)
        ]
        overview = await (await c.client.get("/api/admin/overview")).json()
        assert [j["id"] for j in overview["queue"]] == [j.id for j in jobs]
        assert [j["position"] for j in overview["queue"]] == [1, 2]
        assert overview["workers"][0]["fresh"] is True
        assert overview["workers"][0]["info"]["attention"] == "sla"
        # Shown to people as sentences, not as JSON.
        engine = overview["workers"][0]["engine"]
        assert engine == ["Attention sla", "model: tiny"]
        assert overview["workers"][0]["restarts"] == 0  # a fresh registration is not a restart

        resp = await c.post_json(f"/api/jobs/{jobs[0].id}/cancel")
        assert resp.status == 200 and (await resp.json())["job"]["state"] == "cancelled"
        resp = await c.post_json(f"/api/jobs/{jobs[0].id}/cancel")
        assert resp.status == 409

        resp = await c.post_json("/api/admin/users/limits", {"user_key": "telegram:77", "max_queued": 5, "daily_jobs": "7"})
        assert resp.status == 200, await resp.text()
        users = (await (await c.client.get("/api/admin/users", params={"q": "telegram:77"})).json())["users"]
        assert len(users) == 1
        u = users[0]
        assert (u["max_queued"], u["daily_jobs"], u["daily_gpu_seconds"]) == (5, 7, None)
        assert (u["queued"], u["jobs_today"]) == (1, 1)  # the job cancelled while queued does not count
        resp = await c.post_json("/api/admin/users/limits", {"user_key": "telegram:77", "max_queued": -1})
        assert resp.status == 400
        resp = await c.post_json("/api/admin/users/limits", {"user_key": "nobody", "max_queued": 1})
        assert resp.status == 400

        resp = await c.post_json("/api/admin/users/block", {"user_key": "telegram:77", "reason": "spam"})
        assert resp.status == 200
        async with c.db.read() as s:
            user = (await s.execute(User.__table__.select().where(User.platform_user_id == "77"))).first()
        assert user is not None and user.blocked and user.blocked_reason == "spam"
        assert (await c.job(jobs[1].id))["job"]["state"] == "cancelled"  # blocking cancels queued jobs
        resp = await c.post_json("/api/admin/users/unblock", {"user_key": "telegram:77"})
        assert resp.status == 200
        users = (await (await c.client.get("/api/admin/users", params={"q": "Tim"})).json())["users"]
        assert users[0]["blocked"] is False


async def test_console_operator_is_a_local_owner(tmp_path: Path) -> None:
    # No owners configured: the console (loopback or admin token) still administers, as the local operator.
    async with console(tmp_path, admin={"owners": []}) as c:
        await c.prime()
        resp = await c.post_json("/api/admin/users/block", {"user_key": "telegram:1"})
        body = await resp.json()
        assert resp.status == 200 and body["blocked"] is True
        assert c.scheduler.admin.is_owner(Requester("web", "operator"))



async def test_console_moderation_queue_and_community_settings(tmp_path: Path) -> None:
    async with console(tmp_path, admin={"blocked_words": ["forbiddenword"]}) as c:
        await c.prime()
        resp = await c.submit("a f0rbidden-word fox".replace("-", ""), frames=5)
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "blocked_words" and "f0rbidden" not in body["message"]
        resp = await c.post_json("/api/admin/communities", {
            "platform": "discord", "community": "42", "changes": {"enabled": False, "daily_limit": 3}})
        assert resp.status == 200 and (await resp.json())["enabled"] is False
        resp = await c.post_json("/api/admin/communities", {
            "platform": "discord", "community": "42", "changes": {"daily_limit": 10**6}})
        assert resp.status == 400 and "at most" in (await resp.json())["message"]  # the config is the ceiling
        listed = (await (await c.client.get("/api/admin/communities")).json())["communities"]
        assert [(x["community"], x["enabled"], x["daily_limit"]) for x in listed] == [("42", False, 3)]
        events = (await (await c.client.get("/api/admin/moderation")).json())["events"]
        blocked = [e for e in events if e["action"] == "blocked_prompt"]
        assert blocked[0]["who"] == "web:operator" and blocked[0]["entry"] == "forbiddenword"
        assert blocked[0]["prompt"] == "a f0rbiddenword fox" and blocked[0]["where"].startswith("web:")
        assert [e["where"] for e in events if e["action"] == "community_settings"] == ["discord:42"]
        # The console's moderation page (linked from the admin page) renders this queue with its script.
        page = await c.client.get("/admin/moderation")
        html = await page.text()
        assert page.status == 200 and 'id="moderation-queue"' in html and "/static/moderation.js" in html
        assert 'href="/admin/moderation"' in await (await c.client.get("/admin")).text()
        script = await c.client.get("/static/moderation.js")
        assert script.status == 200 and "/api/admin/moderation" in await script.text()
