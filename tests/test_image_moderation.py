"""Image and video moderation with a tiny randomly initialised classifier saved offline, whose output is forced
(zero weights, one large bias), in a real scheduler with worker processes on the fast test engine."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from moderation_support import models, moderation
from PIL import Image
from scheduler_support import ENGINE_SPEC, Recorder, make_db, make_settings, session_mp4, t2v, until, who
from sqlalchemy import text

from generator.request import GenerationRequest
from generator.scheduler.api import DeliveryTarget, Refusal, Requester
from generator.scheduler.image_moderation import BLOCKED_IMAGE_MESSAGE, BLOCKED_OUTPUT_MESSAGE, ImageModerator
from generator.scheduler.service import Scheduler
from storage import repo_audit

__all__ = ["models"]  # the session fixture, imported so pytest finds it here

CONSOLE = Requester("web", "operator")
UPLOADS = ("sendVideo", "sendAnimation", "sendDocument", "sendPhoto")  # every way Telegram could get the video


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


def stored(path: str | None) -> bool:
    """The file is there (a plain sync check: these tests use the local store)."""
    return path is not None and os.path.isfile(path)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, mp4: Path, model: Path) -> AsyncIterator[tuple[Scheduler, Recorder]]:
    settings = make_settings(tmp_path, moderation=moderation(model))
    db = await make_db(settings)
    sched = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC, worker_env={"TURBOBOT_TEST_MP4": str(mp4)})
    rec = Recorder()
    sched.subscribe("discord", rec)
    await sched.start(run_workers=True)
    try:
        yield sched, rec
    finally:
        await sched.stop()
        await db.dispose()


def channel(nsfw: bool = False) -> DeliveryTarget:
    return DeliveryTarget(platform="discord", chat_id="500", guild_id="42", nsfw=nsfw)


async def delivered_at(sched: Scheduler, job_id: int) -> Any:
    """When the job's terminal event reached its front end (None: not yet)."""
    async with sched.db.read() as s:
        return (await s.execute(text("select delivered_at from jobs where id = :i"), {"i": job_id})).scalar_one()


async def moderation_rows(sched: Scheduler, action: str) -> list[dict[str, Any]]:
    async with sched.db.read() as s:
        rows = await repo_audit.with_actions(s, (action,), limit=10)
    return [json.loads(r.detail) for r in rows]


async def finished(sched: Scheduler, job_id: int) -> Any:
    async with asyncio.timeout(60):
        return await sched.views.wait(job_id)


def test_forced_classifier_and_thresholds(models: dict[str, Path]) -> None:
    im = Image.new("RGB", (40, 30), (1, 2, 3))
    nsfw = ImageModerator(models["nsfw"], {"nsfw": 0.8, "gore": 0.5}, ["nsfw"])
    assert nsfw.scores([im])["nsfw"] == pytest.approx(1.0, abs=1e-6)
    assert nsfw.blocked([im], age_restricted_ok=False) == ["nsfw"]
    assert nsfw.blocked([im], age_restricted_ok=True) == []  # age-restricted: allowed where the policy says so
    gore = ImageModerator(models["gore"], {"nsfw": 0.8, "gore": 0.5}, ["nsfw"])
    assert gore.blocked([im], age_restricted_ok=True) == ["gore"]  # other labels block everywhere
    safe = ImageModerator(models["safe"], {"nsfw": 0.8, "gore": 0.5}, ["nsfw"])
    assert safe.blocked([im], age_restricted_ok=False) == []


async def test_input_image_refused_and_audited(tmp_path: Path, base_mp4: Path, models: dict[str, Path]) -> None:
    async with running(tmp_path, base_mp4, models["nsfw"]) as (sched, _rec):
        sha = await sched.jobs.save_input(who(1, "discord"), png(), 64, 48)
        req = GenerationRequest(mode="i2v", prompt="move", image=sha, frames=5, steps=2)
        with pytest.raises(Refusal) as err:
            await sched.jobs.submit(req, who(1, "discord"), channel(), "i1")
        assert err.value.code == "blocked_image" and err.value.message == BLOCKED_IMAGE_MESSAGE
        async with sched.db.read() as s:
            assert (await s.execute(text("select count(*) from jobs"))).scalar_one() == 0
        (row,) = await moderation_rows(sched, "blocked_image")
        assert row["who"] == "discord:1" and row["where"] == "discord:42/500" and row["entry"] == "nsfw"
        assert row["image"] == sha
        # The console's moderation queue lists it.
        assert [e["action"] for e in await sched.listings.moderation_events()] == ["blocked_image"]


async def test_output_blocked_never_delivered(tmp_path: Path, base_mp4: Path, models: dict[str, Path]) -> None:
    async with running(tmp_path, base_mp4, models["nsfw"]) as (sched, rec):
        sub = await sched.jobs.submit(t2v("a red fox"), who(2, "discord"), channel(), "o1")
        done = await finished(sched, sub.job.id)
        assert done.state == "failed" and done.error_code == "blocked_output" and done.output is None
        assert done.error_message == BLOCKED_OUTPUT_MESSAGE
        await until(lambda: len(rec.terminal(done.id)) == 1, what="terminal event")
        (event,) = rec.terminal(done.id)
        assert event.kind == "failed" and event.job.output is None
        (row,) = await moderation_rows(sched, "blocked_output")
        assert row["who"] == "discord:2" and row["where"] == "discord:42/500" and row["entry"] == "nsfw"
        assert row["job"] == done.id and row["held"] is True
        # Kept for an admin, but nowhere a user could reach it: no output row, nothing to serve (the console's
        # media), not in the user's history as a result.
        held = await sched.listings.held_path(done.id)
        assert stored(held) and os.path.dirname(held or "") == str(sched.outputs_dir)
        assert await sched.listings.media_paths(done.id) == (None, None)
        assert [(j.state, j.output) for j in await sched.views.jobs_for(who(2, "discord"))] == [("failed", None)]
        (event_row,) = [e for e in await sched.listings.moderation_events() if e["action"] == "blocked_output"]
        assert event_row["held"] is True


async def test_release_delivers_once_and_delete_removes(
    tmp_path: Path, base_mp4: Path, models: dict[str, Path]
) -> None:
    """An admin's release turns the held video into the job's output and the hub delivers it exactly once;
    a delete removes the file; neither is open to other users; the sweep keeps held files meanwhile."""
    async with running(tmp_path, base_mp4, models["nsfw"]) as (sched, rec):
        one = await finished(sched, (await sched.jobs.submit(t2v("a fox"), who(2, "discord"), channel(), "r1")).job.id)
        two = await finished(sched, (await sched.jobs.submit(t2v("a cat"), who(2, "discord"), channel(), "r2")).job.id)
        await until(lambda: len(rec.terminal(one.id)) == len(rec.terminal(two.id)) == 1, what="held events")
        kept = {j: await sched.listings.held_path(j) for j in (one.id, two.id)}
        assert await sched.events.sweep() == 0 and all(stored(p) for p in kept.values())

        for actor in (who(2, "discord"), who(7, "telegram")):  # the user themself, anyone else: not admins
            with pytest.raises(Refusal) as err:
                await sched.admin.release_held(one.id, actor)
            assert err.value.code == "forbidden"
            with pytest.raises(Refusal) as err:
                await sched.admin.delete_held(one.id, actor)
            assert err.value.code == "forbidden"

        admin = CONSOLE
        view = await sched.admin.release_held(one.id, admin)
        assert view.state == "succeeded" and view.output is not None and view.error_code == ""
        await until(lambda: [e.kind for e in rec.terminal(one.id)] == ["failed", "succeeded"], what="delivered")
        (delivered,) = [e for e in rec.terminal(one.id) if e.kind == "succeeded"]
        assert delivered.job.output is not None and delivered.job.output.path == kept[one.id]
        # The hub marks the row after every sink took the event, so the recorder may see it first.
        await until(lambda: delivered_at(sched, one.id), what="delivered_at set")
        with pytest.raises(Refusal) as err:  # a second release (two admins at once): nothing held any more
            await sched.admin.release_held(one.id, admin)
        assert err.value.code == "not_found"
        await sched.events.sweep()
        assert stored(kept[one.id])  # now an accepted output
        assert (await sched.listings.media_paths(one.id))[0] == kept[one.id]

        await sched.admin.delete_held(two.id, admin)
        assert not stored(kept[two.id])
        assert await sched.listings.held_path(two.id) is None
        with pytest.raises(Refusal) as err:
            await sched.admin.release_held(two.id, admin)
        assert err.value.code == "not_found"
        assert (await sched.views.get(two.id)).state == "failed"  # type: ignore[union-attr]
        released, deleted = (await moderation_rows(sched, "released_output"), await moderation_rows(sched, "deleted_held"))
        assert [(r["job"], r["by"], r["who"]) for r in released] == [(one.id, "web:operator", "discord:2")]
        assert [(r["job"], r["by"]) for r in deleted] == [(two.id, "web:operator")]
        # Only the released one was ever delivered as a video; nothing more arrives for either.
        await until(lambda: sched.hub.delivered_count >= 3, what="deliveries recorded")
        assert [e.kind for e in rec.terminal(one.id)] == ["failed", "succeeded"]
        assert [e.kind for e in rec.terminal(two.id)] == ["failed"]
        events = {e["job"]: e.get("held") for e in await sched.listings.moderation_events()
                  if e["action"] == "blocked_output"}
        assert events == {one.id: False, two.id: False}


async def test_held_videos_expire_after_the_retention(
    tmp_path: Path, base_mp4: Path, models: dict[str, Path]
) -> None:
    from generator.scheduler.admin import expire_held

    async with running(tmp_path, base_mp4, models["nsfw"]) as (sched, _rec):
        job = await finished(sched, (await sched.jobs.submit(t2v("x"), who(2, "discord"), channel(), "e1")).job.id)
        path = await sched.listings.held_path(job.id)
        assert path is not None
        core = sched._core
        assert await expire_held(core) == 0  # held just now: within [moderation] held_days (30 by default)
        async with sched.db.write() as s:
            await s.execute(text("update held_outputs set held_at = :t"),
                            {"t": dt.datetime.now(dt.UTC) - dt.timedelta(days=31)})
        assert await expire_held(core) == 1
        assert not stored(path) and await sched.listings.held_path(job.id) is None
        (row,) = await moderation_rows(sched, "expired_held")
        assert row["job"] == job.id and "30 days" in row["by"]


async def test_allowed_in_an_nsfw_channel(tmp_path: Path, base_mp4: Path, models: dict[str, Path]) -> None:
    async with running(tmp_path, base_mp4, models["nsfw"]) as (sched, rec):
        admin = who(9, "discord")
        await sched.communities.update(admin, "discord", "42", {"policy": "nsfw_channels"})
        sha = await sched.jobs.save_input(who(3, "discord"), png(), 64, 48)
        req = GenerationRequest(mode="i2v", prompt="move", image=sha, frames=5, steps=2)
        sub = await sched.jobs.submit(req, who(3, "discord"), channel(nsfw=True), "n1")
        done = await finished(sched, sub.job.id)
        assert done.state == "succeeded" and done.output is not None, done.error_message
        await until(lambda: [e.kind for e in rec.terminal(done.id)] == ["succeeded"], what="delivered")
        # The same community outside its NSFW channels: both checks block.
        with pytest.raises(Refusal) as err:
            await sched.jobs.submit(req, who(3, "discord"), channel(nsfw=False), "n2")
        assert err.value.code == "blocked_image"
        out = await finished(sched, (await sched.jobs.submit(t2v("a fox"), who(3, "discord"), channel(), "n3")).job.id)
        assert out.state == "failed" and out.error_code == "blocked_output"


async def test_other_labels_block_even_in_nsfw_channels(
    tmp_path: Path, base_mp4: Path, models: dict[str, Path]
) -> None:
    async with running(tmp_path, base_mp4, models["gore"]) as (sched, _rec):
        await sched.communities.update(who(9, "discord"), "discord", "42", {"policy": "allow"})
        done = await finished(sched, (await sched.jobs.submit(t2v("x"), who(4, "discord"), channel(True), "g1")).job.id)
        assert done.state == "failed" and done.error_code == "blocked_output"
        (row,) = await moderation_rows(sched, "blocked_output")
        assert row["entry"] == "gore"


def test_config_thresholds_are_checked(tmp_path: Path) -> None:
    from turbobot.config import ConfigError

    settings = make_settings(tmp_path, moderation={"image_thresholds": {"nsfw": 0.8}, "nsfw_labels": ["nsfw"]})
    assert settings.moderation.image_thresholds == {"nsfw": 0.8} and settings.moderation.image_model == ""
    with pytest.raises(ConfigError, match=r"image_thresholds\.nsfw must be more than 0"):
        make_settings(tmp_path, moderation={"image_thresholds": {"nsfw": 1.5}})
    with pytest.raises(ConfigError, match="must be a number"):
        make_settings(tmp_path, moderation={"image_thresholds": {"nsfw": "high"}})


async def test_discord_held_video_is_never_uploaded(tmp_path: Path, models: dict[str, Path]) -> None:
    """Through the real discord.py client and the fake Discord: the held video is not uploaded anywhere and the
    user is told; in an NSFW channel of a community whose policy allows it, the same video is delivered."""
    from fakes.discord_harness import discord_env
    from fakes.discord_server import ADMIN_PERMISSIONS

    async with discord_env(tmp_path, moderation=moderation(models["nsfw"])) as env:
        srv = env.server
        alice, boss = srv.new_user("alice"), srv.new_user("boss")
        iid = await srv.slash("t2v", alice, prompt="a red fox", steps=2)

        def told() -> bool:
            msg = srv.original(iid)
            return msg is not None and BLOCKED_OUTPUT_MESSAGE in msg["content"]

        await srv.wait_for(told, 60)
        assert not [m for m in srv.messages.values() if m["attachments"]]  # nothing was ever uploaded
        jobs = await env.sched.views.jobs_for(Requester("discord", alice["id"]))
        assert [(j.state, j.error_code) for j in jobs] == [("failed", "blocked_output")]
        await until(lambda: delivered_at(env.sched, jobs[0].id), what="the held notice recorded as delivered")
        assert not [r for r in srv.requests if r.files]  # not even an upload that failed
        (row,) = await moderation_rows(env.sched, "blocked_output")
        assert row["job"] == jobs[0].id and row["who"] == f"discord:{alice['id']}" and row["held"] is True

        # An admin releases it: the status message gets the video through the normal delivery, once.
        await env.sched.admin.release_held(jobs[0].id, CONSOLE)
        msg = await env.delivered(iid, within=60)
        assert msg["attachments"] and BLOCKED_OUTPUT_MESSAGE not in msg["content"]
        await until(lambda: delivered_at(env.sched, jobs[0].id), what="the release recorded as delivered")
        assert len([r for r in srv.requests if r.files]) == 1
        (row,) = await moderation_rows(env.sched, "released_output")
        assert row["job"] == jobs[0].id and row["by"] == "web:operator"

        await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS,
                                                 policy="nsfw_channels"))
        msg = await env.delivered(await srv.slash("t2v", alice, nsfw=True, prompt="a red fox", steps=2), within=60)
        assert msg["attachments"]


async def test_telegram_held_video_is_never_uploaded_then_released_from_the_console(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Through the real PTB client and the fake Bot API: the held video is never sent (no video, animation,
    document or photo), the user's status message says it was held, the job is marked and audited. Released
    from the console's HTTP API, it is sent to the original chat exactly once."""
    from aiohttp.test_utils import TestClient, TestServer
    from fakes.telegram_server import FakeTelegram
    from fakes.telegram_stack import one_reply, running_stack, submitted

    from bots.web import create_web_app
    from bots.web.security import CSRF_COOKIE, CSRF_HEADER

    ann = FakeTelegram.user(1001, "Ann")
    async with running_stack(tmp_path, moderation=moderation(models["nsfw"])) as stack:
        tg = stack.tg
        chat = tg.private_chat(ann)
        cmd = await tg.send_text(chat, ann, "/t2v a red fox --seed 5")
        status = await submitted(tg, cmd)
        key = (chat["id"], status["message_id"])
        await tg.wait_for(lambda: BLOCKED_OUTPUT_MESSAGE in tg.messages[key]["text"], 60)
        (job,) = await stack.jobs_of(ann["id"])
        assert (job.state, job.error_code, job.output) == ("failed", "blocked_output", None)
        await until(lambda: delivered_at(stack.sched, job.id), what="the held notice recorded as delivered")
        assert not [c for m in UPLOADS for c in tg.calls_of(m)]  # nothing was ever uploaded
        (row,) = await moderation_rows(stack.sched, "blocked_output")
        assert (row["job"], row["who"], row["where"], row["entry"]) == (job.id, "telegram:1001", "telegram:1001", "nsfw")
        assert stored(await stack.sched.listings.held_path(job.id))

        app = create_web_app(stack.settings, stack.sched)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            assert (await client.get("/admin/moderation")).status == 200  # sets the CSRF cookie
            csrf = next(c.value for c in client.session.cookie_jar if c.key == CSRF_COOKIE)
            events = (await (await client.get("/api/admin/moderation")).json())["events"]
            assert [(e["job"], e["held"]) for e in events if e["action"] == "blocked_output"] == [(job.id, True)]
            resp = await client.post("/api/admin/moderation/release", json={"job": job.id}, headers={CSRF_HEADER: csrf})
            assert resp.status == 200, await resp.text()
            video = await one_reply(tg, cmd, "sendVideo")  # a reply to the original command, in its chat
            assert video.files["video"][:12].find(b"ftyp") >= 0 and f"Job #{job.id}" in video.params["caption"]
            await until(lambda: delivered_at(stack.sched, job.id), what="the release recorded as delivered")
            await tg.wait_for(lambda: tg.messages[key]["text"].startswith("Done"))
            again = await client.post("/api/admin/moderation/release", json={"job": job.id},
                                      headers={CSRF_HEADER: csrf})
            assert again.status == 404 and "released or deleted already" in (await again.json())["message"]
        finally:
            await client.close()
        assert len(tg.calls_of("sendVideo")) == 1 and not [c for m in UPLOADS[1:] for c in tg.calls_of(m)]
        (done,) = await stack.jobs_of(ann["id"])
        assert done.state == "succeeded" and done.output is not None
        (row,) = await moderation_rows(stack.sched, "released_output")
        assert row["job"] == job.id and row["by"] == "web:operator" and row["who"] == "telegram:1001"


async def test_console_release_and_delete_over_http(
    tmp_path: Path, base_mp4: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console's endpoints: refused without the admin token (401) or the CSRF token (403); the operator can
    look at a held video, release it (then served as the job's video) or delete it (the file is gone)."""
    from web_support import TOKEN, TOKEN_ENV, console

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    async with console(tmp_path, workers=True, worker_env={"TURBOBOT_TEST_MP4": str(base_mp4)},
                       moderation=moderation(models["nsfw"])) as c:
        sched = c.scheduler
        one = await finished(sched, (await sched.jobs.submit(t2v("a fox"), who(2, "discord"), channel(), "h1")).job.id)
        two = await finished(sched, (await sched.jobs.submit(t2v("a cat"), who(2, "discord"), channel(), "h2")).job.id)
        assert one.error_code == two.error_code == "blocked_output"
        preview = f"/api/admin/moderation/held/{one.id}/video.mp4"

        # Not logged in: nothing (401), not even a look at the held video.
        await c.client.get("/login")  # CSRF cookie
        for verb in ("release", "delete"):
            resp = await c.post_json(f"/api/admin/moderation/{verb}", {"job": one.id})
            assert resp.status == 401, verb
        assert (await c.client.get(preview)).status == 401
        assert (await c.post_json("/login", {"token": TOKEN})).status == 200
        # Logged in, but a cross-site form (no CSRF token): refused (403).
        resp = await c.client.post("/api/admin/moderation/release", json={"job": one.id})
        assert resp.status == 403 and (await resp.json())["error"] == "csrf"
        assert (await c.post_json("/api/admin/moderation/release", {"job": "x"})).status == 400
        assert await sched.listings.held_path(one.id) is not None  # nothing happened to it

        # The operator looks at it; it is not served as the job's video.
        resp = await c.client.get(preview)
        assert resp.status == 200 and resp.content_type == "video/mp4" and (await resp.read())[4:8] == b"ftyp"
        assert (await c.client.get(f"/media/jobs/{one.id}/video.mp4")).status == 404

        resp = await c.post_json("/api/admin/moderation/release", {"job": one.id})
        body = await resp.json()
        assert resp.status == 200 and body["job"]["state"] == "succeeded", body
        assert (await c.client.get(f"/media/jobs/{one.id}/video.mp4")).status == 200
        assert (await c.client.get(preview)).status == 404  # no longer held

        path = await sched.listings.held_path(two.id)
        assert stored(path)
        resp = await c.post_json("/api/admin/moderation/delete", {"job": two.id})
        assert resp.status == 200 and (await resp.json())["deleted"] == two.id
        assert not stored(path)
        resp = await c.post_json("/api/admin/moderation/delete", {"job": two.id})
        assert resp.status == 404
        events = (await (await c.client.get("/api/admin/moderation")).json())["events"]
        assert [(e["action"], e["job"], e.get("by")) for e in events if e["action"] in ("released_output", "deleted_held")
                ] == [("deleted_held", two.id, "web:operator"), ("released_output", one.id, "web:operator")]
