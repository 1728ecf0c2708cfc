"""Image and video moderation with a tiny randomly initialised classifier saved offline, whose output is forced
(zero weights, one large bias), in a real scheduler with worker processes on the fast test engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from scheduler_support import ENGINE_SPEC, Recorder, make_db, make_settings, session_mp4, t2v, until, who
from sqlalchemy import text

from generator.request import GenerationRequest
from generator.scheduler.api import DeliveryTarget, Refusal, Requester
from generator.scheduler.image_moderation import BLOCKED_IMAGE_MESSAGE, BLOCKED_OUTPUT_MESSAGE, ImageModerator
from generator.scheduler.service import Scheduler
from storage import repo_audit

LABELS = {0: "safe", 1: "nsfw", 2: "gore"}


def tiny_classifier(folder: Path, forced: str) -> Path:
    """A 1-layer ViT on 32x32 images whose every answer is ``forced`` (probability ~1)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=len(LABELS), id2label=LABELS,
                       label2id={v: k for k, v in LABELS.items()})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-20.0)
        model.classifier.bias[{v: k for k, v in LABELS.items()}[forced]] = 20.0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def base_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_mp4(tmp_path_factory)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {label: tiny_classifier(root / label, label) for label in LABELS.values()}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def moderation(model: Path) -> dict[str, Any]:
    return {"image_model": str(model), "image_thresholds": {"nsfw": 0.8, "gore": 0.5}, "nsfw_labels": ["nsfw"]}


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
        assert not [p for p in sched.outputs_dir.iterdir() if p.suffix == ".mp4"]  # nothing left to serve
        (row,) = await moderation_rows(sched, "blocked_output")
        assert row["who"] == "discord:2" and row["where"] == "discord:42/500" and row["entry"] == "nsfw"
        assert row["job"] == done.id


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

        await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS,
                                                 policy="nsfw_channels"))
        msg = await env.delivered(await srv.slash("t2v", alice, nsfw=True, prompt="a red fox", steps=2), within=60)
        assert msg["attachments"]
