"""End to end through the real discord.py client, a fake Discord on 127.0.0.1 and the real Scheduler.

Every wait is on an observable change (a message, a callback, a job state), never a sleep.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from fakes.discord_engine import GATES_ENV
from fakes.discord_harness import TOKEN, buttons, discord_env, file_bytes, job_id_of, png_bytes

from turbobot.logs import setup_logging


async def test_t2v_slash_command_delivers_video_with_buttons(tmp_path: Path) -> None:
    log_stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("discord.gateway").level)
    setup_logging("DEBUG", "text", stream=log_stream)
    try:
        # A long status interval: a 4-step job may show at most one intermediate edit before its result.
        async with discord_env(tmp_path, discord={"status_interval_seconds": 3600.0}) as env:
            srv = env.server
            alice = srv.new_user("alice")
            iid = await srv.slash("t2v", alice, prompt="a red fox in snow --seed 4242", aspect="9:16", steps=4)

            status = await env.answered(iid)
            rec = srv.response_of(iid)
            assert rec.acked_at is not None and rec.acked_at - rec.dispatched_at < 3.0
            assert not rec.ephemeral
            job_id = job_id_of(status)

            final = await env.delivered(iid)
            job = await env.sched.views.get(job_id)
            assert job is not None and job.state == "succeeded" and job.output is not None
            # Typed options and inline flags both reached the request.
            assert (job.request.aspect, job.request.steps, job.seed) == ("9:16", 4, 4242)
            assert job.request.prompt == "a red fox in snow"
            # The uploaded file is the job's video, byte for byte.
            att = final["attachments"][0]
            assert att["filename"].endswith(".mp4")
            assert srv.file_bytes(att) == file_bytes(job.output.path)
            text = final["content"]
            assert f"#{job_id}" in text and "seed 4242" in text and "4 steps" in text and "test engine" in text
            assert "untrained demo model" in text
            assert buttons(final) == [f"tb:retry:{job_id}", f"tb:remix:{job_id}", f"tb:extend:{job_id}",
                                      f"tb:params:{job_id}", f"tb:delete:{job_id}"]
            # While it waited/ran the status message had Cancel; edits went through the interaction webhook.
            first_version = srv.history[status["id"]][0]
            assert f"tb:cancel:{job_id}" in buttons(first_version) and "job #" in first_version["content"]
            assert all(r.path.startswith("/webhooks/") for r in srv.requests if r.method == "PATCH")
            intermediate = [v for v in srv.history[status["id"]][1:] if not v["attachments"]]
            assert len(intermediate) <= 1, [v["content"] for v in intermediate]
            # The job's interaction id is its idempotency key: a replayed interaction makes no second job.
            await srv.redispatch(iid)
            await srv.wait_for(lambda: any(r.status == 400 and iid in r.path for r in srv.requests))
            assert [j.id for j in await env.sched.views.jobs_for(_requester(alice))] == [job_id]
    finally:
        root.setLevel(saved[0])
        root.handlers = saved[1]
        logging.getLogger("discord.gateway").setLevel(saved[2])
    logs = log_stream.getvalue()
    assert "logging in using static token" in logs  # debug logging was really on
    assert TOKEN not in logs


def _requester(user: dict[str, str]):  # type: ignore[no-untyped-def]
    from generator.scheduler.api import Requester

    return Requester("discord", user["id"], user["username"])


async def test_context_menu_animates_an_image_with_the_default_prompt(tmp_path: Path) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice, bob = srv.new_user("alice"), srv.new_user("bob")
        data = png_bytes(80, 60)
        posted = srv.user_message(bob, "look at this", [srv.attachment("cat.png", data, "image/png", width=80, height=60)])

        iid = await srv.context_menu("Animate this image", alice, posted)
        await srv.wait_for(lambda: srv.response_of(iid).acked)
        assert srv.response_of(iid).callback_type == 9  # a modal asking for the motion prompt
        sid = await srv.submit_modal(iid, alice, {"prompt": ""})

        final = await env.delivered(sid)
        job = await env.sched.views.get(job_id_of(final))
        assert job is not None and job.request.mode == "i2v"
        assert job.request.prompt == env.settings.defaults.i2v_prompt
        assert job.request.image is not None and len(job.request.image) == 64
        assert job.requester.user_id == alice["id"]
        assert final["attachments"][0]["filename"].endswith(".mp4")

        # The same through /i2v with the image attached and typed options.
        iid = await srv.slash("i2v", alice, image=srv.attachment("dog.jpg", png_bytes(90, 70, "JPEG"), "image/jpeg",
                                                                  width=90, height=70),
                              prompt="the dog wags its tail --ode", adaptive=True, frames=5)
        final = await env.delivered(iid)
        job = await env.sched.views.get(job_id_of(final))
        assert job is not None and job.request.mode == "i2v"
        assert (job.request.prompt, job.request.sampler, job.request.adaptive_resolution, job.request.frames) == (
            "the dog wags its tail", "ode", True, 5)


async def test_remix_and_retry_buttons_work_after_a_restart(tmp_path: Path) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a lighthouse at night --seed 777")
        first = await env.delivered(iid)
        parent = job_id_of(first)

        await env.restart()  # new process: new Scheduler, new bot, nothing in memory

        click = await srv.click(first["id"], f"tb:remix:{parent}", alice)
        await srv.wait_for(lambda: srv.response_of(click).acked)
        modal = srv.response_of(click).callback_data
        assert srv.response_of(click).callback_type == 9 and modal is not None
        prefilled = {c["custom_id"]: c.get("value") for row in modal["components"] for c in row["components"]}
        assert prefilled["prompt"] == "a lighthouse at night"
        assert "--steps 2" in prefilled["flags"] and "--seed" not in prefilled["flags"]

        sid = await srv.submit_modal(click, alice, {"prompt": "a lighthouse in a storm",
                                                    "flags": prefilled["flags"].replace("--ar 16:9", "--ar 1:1")})
        remixed = await env.delivered(sid)
        child = await env.sched.views.get(job_id_of(remixed))
        assert child is not None and child.parent_id == parent
        assert (child.seed, child.request.prompt, child.request.aspect) == (777, "a lighthouse in a storm", "1:1")
        assert f"Remix of job #{parent}" in remixed["content"]

        retry = await srv.click(first["id"], f"tb:retry:{parent}", alice)
        retried = await env.delivered(retry)
        again = await env.sched.views.get(job_id_of(retried))
        assert again is not None and again.parent_id == parent and again.seed != 777
        assert (child.lineage, again.lineage) == ("remix", "retry")
        assert f"Retry of job #{parent}" in retried["content"] and "Remix of" not in retried["content"]
        # Its Params say so too.
        click = await srv.click(retried["id"], f"tb:params:{again.id}", alice)
        assert f"(retry of #{parent})" in await env.private_answer(click)
        assert again.request.prompt == "a lighthouse at night"

        # /remix as a slash command: same seed, new prompt and options.
        iid = await srv.slash("remix", alice, job=str(parent), prompt="a lighthouse at dawn", steps=1)
        slashed = await env.delivered(iid)
        child2 = await env.sched.views.get(job_id_of(slashed))
        assert child2 is not None and child2.parent_id == parent
        assert (child2.seed, child2.request.prompt, child2.request.steps) == (777, "a lighthouse at dawn", 1)



async def test_extend_button_and_slash_command(tmp_path: Path) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a lighthouse at night --seed 555")
        first = await env.delivered(iid)
        parent = job_id_of(first)
        click = await srv.click(first["id"], f"tb:extend:{parent}", alice)
        extended = await env.delivered(click)
        child = await env.sched.views.get(job_id_of(extended))
        base = await env.sched.views.get(parent)
        assert child is not None and base is not None and child.output is not None and base.output is not None
        assert (child.parent_id, child.lineage, child.seed, child.request.mode) == (parent, "extend", 555, "i2v")
        assert child.output.frames == 2 * base.output.frames - 1
        assert f"Extension of job #{parent}" in extended["content"]
        iid = await srv.slash("extend", alice, job=str(child.id), prompt="the light goes out")
        chained = await env.sched.views.get(job_id_of(await env.delivered(iid)))
        assert chained is not None and chained.output is not None and chained.parent_id == child.id
        assert chained.request.prompt == "the light goes out" and chained.output.frames == 3 * base.output.frames - 2


PHASES = (("Encoding the prompt", "text"), ("Decoding the video", "decode"), ("Encoding the mp4", "encode"))


async def test_status_shows_decoding_and_encoding_as_their_own_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding and the mp4 encode take seconds after the last step: the status says so instead of 100%.
    The test engine stays in each phase until its gate is opened, so nothing here depends on timing."""
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(GATES_ENV, str(gates))  # inherited by the worker process
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a tide coming in [phases]", steps=2)
        status = await env.answered(iid)
        job_id = job_id_of(status)
        for words, gate in PHASES:
            await srv.wait_for(lambda w=words: w in (srv.messages[status["id"]]["content"] or ""), 30)
            (gates / f"{job_id}-{gate}").touch()
        final = await env.delivered(iid)
        assert f"Job #{job_id}" in final["content"]
        shown = [line for v in srv.history[status["id"]] for line in v["content"].splitlines()]
        decoding = next(line for line in shown if line.startswith("Decoding the video"))
        assert "(sampled 2/2 steps)" in decoding and "100%" not in decoding
        # Every phase was shown, in order, never going back.
        words = [w for w, _ in PHASES]
        order = [w for line in shown for w in words if line.startswith(w)]
        assert list(dict.fromkeys(order)) == words and order == sorted(order, key=words.index)
