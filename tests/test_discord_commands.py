"""Refusals, cancel, information and admin commands, through the real client and the real Scheduler."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from fakes.discord_harness import buttons, discord_env, job_id_of, png_bytes

import bots.discord.respond as respond
from generator.scheduler.api import Requester


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def who(user: dict[str, str]) -> Requester:
    return Requester("discord", user["id"], user["username"])


async def test_bad_attachments_are_refused_privately(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False) as env:
        srv = env.server
        alice = srv.new_user("alice")
        max_bytes = env.settings.limits.max_image_bytes
        # (attachment, part of the answer, downloaded?) -- metadata checks must refuse before any download.
        cases = [
            (srv.attachment("huge.png", png_bytes(), "image/png", width=64, height=48, size=max_bytes + 1),
             "too big", False),
            (srv.attachment("empty.png", b"", "image/png", size=0), "empty", False),
            (srv.attachment("doc.pdf", b"%PDF-1.4 hello", "application/pdf"), "not a supported image", False),
            (srv.attachment("anim.gif", b"GIF89a....", "image/gif"), "not a supported image", False),
            (srv.attachment("wide.png", png_bytes(), "image/png", width=30000, height=30000), "too large", False),
            (srv.attachment("garbage.png", b"this is not an image at all " * 20, "image/png"),
             "PNG, JPEG or WebP", True),
            (srv.attachment("cut.png", png_bytes(200, 200)[:120], "image/png"), "corrupt or truncated", True),
            (srv.attachment("bomb.png", bomb_png(30000, 30000), "image/png"), "too large", True),
        ]
        for att, expected, downloaded in cases:
            before = len(srv.cdn_downloads)
            iid = await srv.slash("i2v", alice, image=att, prompt="make it move")
            answer = await env.private_answer(iid)
            assert expected in answer, (att["filename"], answer)
            assert (len(srv.cdn_downloads) > before) == downloaded, att["filename"]
            assert srv.response_of(iid).ephemeral

        # The context menu refuses a message without an image, and an unsupported file, before any modal.
        plain = srv.user_message(alice, "just text")
        iid = await srv.context_menu("Animate this image", alice, plain)
        assert "no image" in await env.private_answer(iid)
        pdf = srv.user_message(alice, "", [srv.attachment("x.pdf", b"%PDF", "application/pdf")])
        iid = await srv.context_menu("Animate this image", alice, pdf)
        assert "not a supported image" in await env.private_answer(iid)
        assert await env.sched.views.jobs_for(who(alice)) == []


async def test_quota_refusal_is_private_and_friendly(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False, quotas={"max_queued_per_user": 1}) as env:
        srv = env.server
        alice = srv.new_user("alice")
        first = await env.answered(await srv.slash("t2v", alice, prompt="one"))
        assert not first["flags"] & 64
        iid = await srv.slash("t2v", alice, prompt="two")
        answer = await env.private_answer(iid)
        assert "waiting (the limit is 1)" in answer
        # Nothing public was left behind for the refused request, and only one job exists.
        assert all(m["flags"] & 64 for m in srv.messages_in() if m["id"] == srv.response_of(iid).original_message_id)
        assert len(await env.sched.views.jobs_for(who(alice))) == 1
        # A crafted payload outside the advertised ranges is refused by the server-side validation.
        iid = await srv.slash("t2v", alice, prompt="three --frames 12")
        assert "Frames must be 1 more than a multiple of 4" in await env.private_answer(iid)


async def test_cancel_queued_job_with_slash_command_then_delete(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False) as env:
        srv = env.server
        alice, bob = srv.new_user("alice"), srv.new_user("bob")
        status = await env.answered(await srv.slash("t2v", alice, prompt="a queued thing"))
        job_id = job_id_of(status)

        # Someone else cannot cancel it.
        click = await srv.click(status["id"], f"tb:cancel:{job_id}", bob)
        assert "Only the person who asked" in await env.private_answer(click)

        iid = await srv.slash("cancel", alice)
        assert await env.private_answer(iid) == f"Cancelled job #{job_id}."
        await srv.wait_for(lambda: "Cancelled" in srv.messages[status["id"]]["content"])
        assert buttons(srv.messages[status["id"]]) == [f"tb:retry:{job_id}", f"tb:params:{job_id}",
                                                      f"tb:delete:{job_id}"]

        click = await srv.click(status["id"], f"tb:delete:{job_id}", alice)
        assert f"Deleted job #{job_id}" in await env.private_answer(click)
        assert status["id"] not in srv.messages
        assert await env.sched.views.get(job_id) is None


async def test_cancel_button_stops_a_running_job(tmp_path: Path) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="[hold] a spinning top")
        status = await env.answered(iid)
        job_id = job_id_of(status)
        await srv.wait_for(lambda: "Rendering" in srv.messages[status["id"]]["content"], 30)

        click = await srv.click(status["id"], f"tb:cancel:{job_id}", alice)
        assert f"job #{job_id}" in await env.private_answer(click)
        await srv.wait_for(lambda: "Cancelled" in srv.messages[status["id"]]["content"], 30)
        job = await env.sched.views.get(job_id)
        assert job is not None and job.state == "cancelled" and job.output is None


async def test_information_commands_forget_and_admin(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False, owner_is_admin=True) as env:
        srv = env.server
        alice, mallory = srv.new_user("alice"), srv.new_user("mallory")
        owner = srv.owner
        status = await env.answered(await srv.slash("t2v", alice, prompt="a fox at dawn --seed 99"))
        job_id = job_id_of(status)

        queue = await env.private_answer(await srv.slash("queue", alice))
        assert f"job #{job_id}" in queue and "Jobs today: 1 of 50" in queue
        jobs = await env.private_answer(await srv.slash("jobs", alice))
        assert f"#{job_id} queued · seed 99" in jobs
        assert "Animate this image" in await env.private_answer(await srv.slash("help", alice))
        params = await env.private_answer(await srv.click(status["id"], f"tb:params:{job_id}", alice))
        assert "seed: 99" in params and "--seed 99" in params

        # /remix autocomplete lists the user's own jobs, filtered by what was typed.
        auto = await srv.autocomplete("remix", alice, "job", job="fox")
        await srv.wait_for(lambda: srv.response_of(auto).acked)
        choices = srv.response_of(auto).callback_data["choices"]  # type: ignore[index]
        assert [c["value"] for c in choices] == [str(job_id)] and "seed 99" in choices[0]["name"]
        auto = await srv.autocomplete("remix", mallory, "job", job="")
        await srv.wait_for(lambda: srv.response_of(auto).acked)
        assert srv.response_of(auto).callback_data["choices"] == []  # type: ignore[index]

        # Admin commands are owner-only; block then unblock.
        refused = await env.private_answer(await srv.slash("admin block", mallory, user=alice))
        assert "Only the bot's owners" in refused
        assert "Blocked" in await env.private_answer(await srv.slash("admin block", owner, user=mallory, reason="spam"))
        assert "not allowed" in await env.private_answer(await srv.slash("t2v", mallory, prompt="x"))
        assert "Unblocked" in await env.private_answer(await srv.slash("admin unblock", owner, user=mallory))
        await env.answered(await srv.slash("t2v", mallory, prompt="now allowed"))
        assert "updated" in await env.private_answer(await srv.slash("admin limits", owner, user=mallory,
                                                                     max_queued=5))
        puts = len([r for r in srv.requests if r.method == "PUT"])
        synced = await env.private_answer(await srv.slash("admin sync", owner, scope="here"))
        assert "Synced 13 command(s) to this server" in synced
        assert len([r for r in srv.requests if r.method == "PUT"]) == puts + 1

        # /forget asks first; only the asker can confirm; then everything of theirs is gone.
        ask = await env.private_answer(await srv.slash("forget", alice))
        assert "cannot be undone" in ask
        confirm_msg = srv.original(list(srv.interactions)[-1])
        assert confirm_msg is not None
        yes = f"tb:forget:yes:{alice['id']}"
        assert yes in buttons(confirm_msg)
        other = await srv.click(confirm_msg["id"], yes, mallory)
        assert "belongs to someone else" in await env.private_answer(other)
        await srv.click(confirm_msg["id"], yes, alice)
        await srv.wait_for(lambda: "deleted 1 job" in srv.messages[confirm_msg["id"]]["content"])
        assert await env.sched.views.jobs_for(who(alice)) == []
        assert len(await env.sched.views.jobs_for(who(mallory))) == 1


async def test_interaction_sent_while_disconnected_arrives_after_resume(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False) as env:
        srv = env.server
        alice = srv.new_user("alice")
        await srv.drop_gateway()
        iid = await srv.slash("help", alice)  # queued by the fake, replayed on RESUME
        assert "turbobot" in await env.private_answer(iid)
        assert srv.resumes == 1 and srv.identifies == 1


async def test_slow_answers_defer_first_and_refusals_stay_private(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # As if every submit took longer than the acknowledgement budget: the bot must "think" first.
    monkeypatch.setattr(respond, "ACK_BUDGET_S", 0.0)
    async with discord_env(tmp_path, workers=False, quotas={"max_queued_per_user": 1}) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="deferred but fine")
        status = await env.answered(iid)
        assert srv.response_of(iid).callback_type == 5  # deferred, then the placeholder became the status
        assert "Queued" in status["content"] and not status["flags"] & 64
        job_id = job_id_of(status)

        async def stored() -> bool:
            job = await env.sched.views.get(job_id)
            return job is not None and job.target.status_message_id == status["id"]

        await env.eventually(stored)

        iid = await srv.slash("t2v", alice, prompt="over the limit")
        assert "the limit is 1" in await env.private_answer(iid)
        rec = srv.response_of(iid)
        assert rec.callback_type == 5 and rec.original_message_id not in srv.messages  # placeholder removed


async def test_fresh_deploy_without_dev_guilds_registers_globally_once(tmp_path: Path) -> None:
    async with discord_env(tmp_path, workers=False, discord={"dev_guild_ids": []}) as env:
        srv = env.server
        names = {c["name"] for c in srv.global_commands}
        assert {"t2v", "i2v", "remix", "extend", "Animate this image", "admin"} <= names
        assert not srv.guild_commands
        versions = [c["version"] for c in srv.global_commands]
        await env.stop_bot()
        await env.start_bot()  # same command set: no second global sync
        assert [c["version"] for c in srv.global_commands] == versions
