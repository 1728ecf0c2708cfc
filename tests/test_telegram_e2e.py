"""End to end through the real PTB client, the real Scheduler (temp-file SQLite, a worker process running
the fast test engine) and a fake Bot API server on 127.0.0.1."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from fakes.telegram_engine import GATES_ENV
from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import TOKEN, Stack, make_settings, one_reply, replies_to, running_stack, submitted
from PIL import Image

from generator.scheduler.api import Requester

ANN = FakeTelegram.user(1001, "Ann")
BOB = FakeTelegram.user(1002, "Bob")


def jpeg(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def buttons(call_or_msg: Any) -> list[str]:
    markup = call_or_msg.params.get("reply_markup") if hasattr(call_or_msg, "params") else call_or_msg.get(
        "reply_markup"
    )
    return [b["callback_data"] for row in (markup or {}).get("inline_keyboard", []) for b in row]


async def delivered(stack: Stack, command: dict[str, Any]) -> Any:
    """The sendVideo call that answers ``command``, once it happened."""
    return await one_reply(stack.tg, command, "sendVideo")


async def test_t2v_delivers_a_video_with_buttons_and_one_edited_status(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a red fox\nrunning through   snow --seed 77 --steps 2")
        video = await delivered(stack, cmd)

        (job,) = await stack.jobs_of(ANN["id"])
        assert job.state == "succeeded" and job.seed == 77
        assert job.request.prompt == "a red fox running through snow"  # multi-line raw text, not context.args
        assert video.params["supports_streaming"] == "true"
        assert video.files["video"][:12].find(b"ftyp") >= 0  # the mp4 itself went up as multipart
        caption = tg.message(chat["id"], video.result["message_id"])["caption"]
        for part in (f"Job #{job.id}", "seed 77", "tiny-t2v", "2 steps", "untrained demo model"):
            assert part in caption
        assert buttons(video) == [
            f"retry:{job.id}", f"remix:{job.id}", f"extend:{job.id}", f"params:{job.id}", f"delete:{job.id}"
        ]

        # Exactly one status message, a reply to the command, edited in place and finally "Done".
        (status_call,) = replies_to(tg, cmd)
        status_id = status_call.result["message_id"]
        assert job.target.status_message_id == str(status_id)
        await tg.wait_for(lambda: tg.message(chat["id"], status_id)["text"].startswith("Done"))
        status = tg.message(chat["id"], status_id)
        assert f"job #{job.id}" in status["text"] and "seed 77" in status["text"]
        assert "reply_markup" not in status  # no Cancel button once finished
        edits = [c for c in tg.calls_of("editMessageText") if c.params["message_id"] == status_id]
        assert any(buttons(c) == [f"cancel:{job.id}"] for c in edits)  # Cancel while it waited/ran
        assert len(tg.calls_of("sendMessage")) == 1  # nothing but the status message was sent


async def test_i2v_by_caption_and_by_reply(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        group = tg.group_chat(-100777)
        by_caption = await tg.send_photo(group, ANN, jpeg(), width=64, height=48, caption="/i2v the water ripples")
        image_doc = await tg.send_document(group, BOB, jpeg(80, 64), mime_type="image/jpeg",
                                           file_name="pic.jpg", caption="look at this")
        by_reply = await tg.send_text(group, ANN, "/i2v --seed 5", reply_to=image_doc)
        not_ours = await tg.send_photo(group, ANN, jpeg(), width=64, height=48, caption="/i2v@other_bot hi")
        named = await tg.send_text(group, BOB, "/t2v@turbo_test_bot a boat")
        await delivered(stack, by_caption)
        await delivered(stack, by_reply)
        await delivered(stack, named)
        assert replies_to(tg, not_ours) == []  # a caption command for another bot is not ours

        by_command = {int(j.target.reply_to_message_id): j for j in await stack.jobs_of(ANN["id"])}
        jobs = [by_command[by_caption["message_id"]], by_command[by_reply["message_id"]]]
        assert [j.request.mode for j in jobs] == ["i2v", "i2v"]
        assert jobs[0].request.prompt == "the water ripples"
        assert jobs[1].seed == 5 and jobs[1].request.prompt == stack.settings.defaults.i2v_prompt
        assert jobs[0].request.image != jobs[1].request.image  # each image stored, re-encoded, by sha256
        for job in jobs:
            assert (stack.settings.path(stack.settings.app.inputs_dir) / f"{job.request.image}.png").is_file()
        # Both images were fetched through getFile + the file route, each once (not the other bot's).
        assert len([c for c in tg.calls if c.method == "download"]) == 2


async def test_edited_or_redelivered_command_never_makes_a_second_job(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a lighthouse at night")
        await delivered(stack, cmd)
        await tg.edit_text(cmd, "/t2v a lighthouse at noon")
        # Telegram re-sends an update it thinks was not confirmed (e.g. after a crash): same message id.
        await tg._push({"message": dict(cmd, text="/t2v a lighthouse at night")})
        await tg.wait_call("deleteMessage")  # the redundant status message of the duplicate is removed
        probe = await tg.send_text(chat, ANN, "/jobs")
        (listing,) = await tg.wait_for(lambda: [c for c in tg.calls_of("sendMessage") if (
            c.params.get("reply_parameters") or {}).get("message_id") == probe["message_id"]])
        assert listing.status == 200, listing.params["text"]  # Telegram accepted the HTML
        assert listing.params["text"].count("a lighthouse") == 1

        jobs = await stack.jobs_of(ANN["id"])
        assert len(jobs) == 1 and jobs[0].request.prompt == "a lighthouse at night"
        assert len(replies_to(tg, cmd, "sendVideo")) == 1


async def test_bad_input_gets_one_clear_reply_and_no_job(tmp_path: Path) -> None:
    # The default i2v prompt must fit the prompt limit too (the configuration refuses one that does not).
    async with running_stack(tmp_path, limits={"max_prompt_chars": 50}, defaults={"i2v_prompt": "gentle motion"}) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cases = [
            (tg.send_photo(chat, ANN, jpeg(), width=4000, height=3000, caption="/i2v go",
                           reported_size=25 * 1024 * 1024), "too big"),
            (tg.send_document(chat, ANN, jpeg()[:200], mime_type="image/jpeg", file_name="x.jpg",
                              caption="/i2v go"), "corrupt"),
            (tg.send_document(chat, ANN, b"", mime_type="image/png", file_name="x.png", caption="/i2v go"),
             "empty"),
            (tg.send_document(chat, ANN, b"%PDF-1.4 ...", mime_type="application/pdf", file_name="x.pdf",
                              caption="/i2v go"), "not a supported image"),
            (tg.send_text(chat, ANN, "/i2v make it move"), "reply to an image"),
            (tg.send_text(chat, ANN, "/t2v a cat --colour red"), "Unknown option --colour"),
            (tg.send_text(chat, ANN, "/t2v " + "very " * 30 + "long"), "too long"),
            (tg.send_text(chat, ANN, "/t2v a cat --steps 9"), "Steps must be from 1 to 4"),
            (tg.send_text(chat, ANN, "/t2v   "), "Describe the video"),
            (tg.send_text(chat, ANN, "/remix"), "/remix <job>"),
            (tg.send_text(chat, ANN, "/remix 999 a dog"), "does not exist"),
            (tg.send_text(chat, ANN, "/cancel soon"), "/cancel <job>"),
        ]
        for make, expect in cases:
            msg = await make
            # Refused by the scheduler (unknown job): shown in the status message; else a plain reply.
            text = (await submitted(tg, msg))["text"]
            assert expect.lower() in text.lower(), (expect, text)
            assert len(replies_to(tg, msg)) == 1
        assert await stack.jobs_of(ANN["id"]) == []
        # Only the corrupt file was downloaded: size, emptiness and type were judged from metadata.
        assert len([c for c in tg.calls if c.method == "download"]) == 1
        assert not [c for c in tg.calls_of("getFile") if c.params["file_id"] == "FILE0002"]  # the huge photo


async def test_flood_429_is_waited_out_and_failed_edits_send_nothing_new(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        tg.fail_next("sendMessage", retry_after=1)  # the status message hits flood control once
        cmd = await tg.send_text(chat, ANN, "/t2v waves on a beach")
        await delivered(stack, cmd)
        sends = tg.calls_of("sendMessage")
        assert [c.status for c in sends] == [429, 200]
        assert sends[1].at - sends[0].at >= 1.0  # AIORateLimiter waited retry_after before retrying

        # The user deletes the status message: edits fail, and no replacement message is ever sent.
        cmd2 = await tg.send_text(chat, ANN, "/t2v hold this pose")
        status_id = (await submitted(tg, cmd2))["message_id"]
        del tg.messages[(chat["id"], status_id)]
        (job,) = [j for j in await stack.jobs_of(ANN["id"]) if "hold" in j.request.prompt]
        await stack.sched.admin.cancel(job.id, Requester("telegram", str(ANN["id"])))
        assert (await stack.wait_job(job.id)).state == "cancelled"
        await tg.wait_for(lambda: [c for c in tg.calls_of("editMessageText")
                                   if c.params["message_id"] == status_id and c.status == 400])
        probe = await tg.send_text(chat, ANN, "/queue")
        await one_reply(tg, probe)
        assert len([c for c in tg.calls_of("sendMessage") if c.status == 200]) == 3  # 2 statuses + /queue


async def test_cancel_button_and_cancel_command(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v hold still")
        status_call = await one_reply(tg, cmd)
        status_id = status_call.result["message_id"]
        await tg.wait_for(lambda: buttons(tg.message(chat["id"], status_id)))
        (job,) = await stack.jobs_of(ANN["id"])

        # Someone else cannot cancel it.
        qid_bob = await tg.click(BOB, tg.message(chat["id"], status_id), f"cancel:{job.id}")
        await tg.wait_for(lambda: qid_bob in tg.callback_answers)
        refusal = await tg.wait_for(lambda: [c for c in tg.calls_of("sendMessage") if "Only the person" in
                                             str(c.params.get("text"))])
        assert refusal
        assert (await stack.sched.views.get(job.id)).state in ("queued", "running")  # type: ignore[union-attr]

        qid = await tg.click(ANN, tg.message(chat["id"], status_id), f"cancel:{job.id}")
        assert (await stack.wait_job(job.id)).state == "cancelled"
        await tg.wait_for(lambda: tg.message(chat["id"], status_id)["text"].startswith("Cancelled"))
        assert qid in tg.callback_answers
        assert not tg.calls_of("sendVideo")

        cmd2 = await tg.send_text(chat, ANN, "/t2v hold again")
        await submitted(tg, cmd2)
        stop = await tg.send_text(chat, ANN, "/cancel")
        reply = await one_reply(tg, stop)
        assert "job #" in reply.params["text"].lower()
        jobs = await stack.jobs_of(ANN["id"])
        for j in jobs:
            assert (await stack.wait_job(j.id)).state == "cancelled"


async def test_extend_button_and_command_deliver_one_joined_video(tmp_path: Path) -> None:
    from generator.media import probe

    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a paper boat --seed 99")
        video = await delivered(stack, cmd)
        (first,) = await stack.jobs_of(ANN["id"])
        assert first.output is not None
        await tg.click(ANN, tg.message(chat["id"], video.result["message_id"]), f"extend:{first.id}")
        await tg.wait_for(lambda: len(tg.calls_of("sendVideo")) == 2)
        ext = next(j for j in await stack.jobs_of(ANN["id"]) if j.id != first.id)
        assert (ext.parent_id, ext.lineage, ext.seed, ext.request.mode) == (first.id, "extend", 99, "i2v")
        assert ext.request.prompt == first.request.prompt and ext.output is not None
        assert ext.output.frames == 2 * first.output.frames - 1 == probe(ext.output.path).frames
        caption = tg.message(chat["id"], tg.calls_of("sendVideo")[-1].result["message_id"])["caption"]
        assert f"Extension of job #{first.id}" in caption
        # /extend JOB prompt: chained onto the extension, with a new prompt.
        again = await tg.send_text(chat, ANN, f"/extend {ext.id} the boat sails away")
        await delivered(stack, again)
        chained = next(j for j in await stack.jobs_of(ANN["id"]) if j.parent_id == ext.id)
        assert chained.request.prompt == "the boat sails away" and chained.output is not None
        assert chained.output.frames == 3 * first.output.frames - 2
        # Bad input: no job id; someone else's job in another chat; a job that does not exist.
        usage = await tg.send_text(chat, ANN, "/extend")
        assert "/extend" in (await one_reply(tg, usage, "sendMessage")).params["text"]
        bob_chat = tg.private_chat(BOB)
        theirs = await tg.send_text(bob_chat, BOB, f"/extend {first.id}")
        answer = await one_reply(tg, theirs, "sendMessage")
        await tg.wait_for(lambda: "cannot be extended here" in tg.message(bob_chat["id"], answer.result["message_id"])["text"])
        assert len(await stack.jobs_of(BOB["id"])) == 0


async def test_buttons_work_after_a_restart_remix_retry_params_delete(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a paper boat --seed 4242")
        video = await delivered(stack, cmd)
        result_msg = tg.message(chat["id"], video.result["message_id"])
        (first,) = await stack.jobs_of(ANN["id"])

        await stack.restart()  # new scheduler and new bot: nothing in memory survives

        # Remix: the callback is answered first, then a ForceReply question asks for the new prompt.
        qid = await tg.click(ANN, result_msg, f"remix:{first.id}")
        ask = await tg.wait_call("sendMessage", lambda c: "Remix of job" in c.params["text"])
        answer_at = next(c.at for c in tg.calls if c.method == "answerCallbackQuery"
                         and c.params["callback_query_id"] == qid)
        assert answer_at <= ask[0].at
        assert ask[0].params["reply_markup"]["force_reply"] is True
        question = tg.message(chat["id"], ask[0].result["message_id"])
        reply = await tg.send_text(chat, ANN, "a paper boat in a storm --steps 1", reply_to=question)
        remix_video = await delivered(stack, reply)

        # Retry from the same (old) result message: same parameters, new seed.
        await tg.click(ANN, result_msg, f"retry:{first.id}")
        await tg.wait_for(lambda: len(tg.calls_of("sendVideo")) == 3)
        retry_video = tg.calls_of("sendVideo")[-1]

        jobs = {j.id: j for j in await stack.jobs_of(ANN["id"])}
        remix = next(j for j in jobs.values() if j.request.prompt == "a paper boat in a storm")
        retry = next(j for j in jobs.values() if j.id not in (first.id, remix.id))
        assert remix.parent_id == first.id and remix.seed == 4242 and remix.request.steps == 1
        assert retry.parent_id == first.id and retry.seed != 4242 and retry.request.prompt == first.request.prompt
        assert f"Remix of job #{first.id}" in tg.message(chat["id"], remix_video.result["message_id"])["caption"]
        # A retry says so (it is not a remix), in the caption and in its parameters.
        assert (remix.lineage, retry.lineage) == ("remix", "retry")
        retry_caption = tg.message(chat["id"], retry_video.result["message_id"])["caption"]
        assert f"Retry of job #{first.id}" in retry_caption and "Remix" not in retry_caption

        # /remix as a reply to a result video, and /remix <job> with flags.
        by_reply = await tg.send_text(chat, ANN, "/remix --steps 1",
                                      reply_to=tg.message(chat["id"], remix_video.result["message_id"]))
        await delivered(stack, by_reply)
        by_id = await tg.send_text(chat, ANN, f"/remix #{first.id} a paper plane")
        await delivered(stack, by_id)
        jobs = await stack.jobs_of(ANN["id"])
        assert any(j.parent_id == remix.id and j.request.prompt == remix.request.prompt for j in jobs)
        assert any(j.parent_id == first.id and j.request.prompt == "a paper plane" for j in jobs)

        # Params, then Delete (only the owner may delete).
        await tg.click(ANN, result_msg, f"params:{first.id}")
        params = await tg.wait_call("sendMessage", lambda c: "Parameters of job" in c.params["text"])
        assert "--seed 4242" in tg.message(chat["id"], params[0].result["message_id"])["text"]
        await tg.click(BOB, result_msg, f"delete:{first.id}")
        await tg.wait_call("sendMessage", lambda c: "Only the person" in c.params["text"])
        assert await stack.sched.views.get(first.id) is not None
        await tg.click(ANN, result_msg, f"delete:{first.id}")
        await tg.wait_call("deleteMessage", lambda c: c.params["message_id"] == result_msg["message_id"])
        assert await stack.sched.views.get(first.id) is None
        assert tg.message(chat["id"], result_msg["message_id"]) is None


async def test_queue_jobs_help_forget_and_owner_commands(tmp_path: Path) -> None:
    owner = FakeTelegram.user(1, "Owner")
    async with running_stack(tmp_path, admin={"owners": ["telegram:1"]}) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        for text, expect in (("/help", "/t2v"), ("/start", "/remix"), ("/queue", "Jobs today"),
                             ("/jobs", "no jobs yet")):
            msg = await tg.send_text(chat, ANN, text)
            reply = await one_reply(tg, msg)
            assert expect in tg.message(chat["id"], reply.result["message_id"])["text"]
        assert [c["command"] for c in tg.commands][:2] == ["t2v", "i2v"]

        # Admin: refused for others; the owner blocks Bob, whose next request is refused clearly.
        denied = await tg.send_text(chat, ANN, "/block 1002")
        assert "owner" in (await one_reply(tg, denied)).params["text"]
        block = await tg.send_text(tg.private_chat(owner), owner, "/block 1002 spam")
        assert "blocked" in (await one_reply(tg, block)).params["text"]
        limits = await tg.send_text(tg.private_chat(owner), owner, "/limits 1001 daily_jobs=1")
        assert "set" in (await one_reply(tg, limits)).params["text"]
        bob_try = await tg.send_text(tg.private_chat(BOB), BOB, "/t2v anything")
        status = await one_reply(tg, bob_try)
        await tg.wait_for(lambda: tg.message(BOB["id"], status.result["message_id"])["text"] != "⏳ Submitting…")
        assert "not allowed" in tg.message(BOB["id"], status.result["message_id"])["text"]
        assert await stack.jobs_of(BOB["id"]) == []

        # Ann's daily limit is now 1: one job, then a clear refusal.
        first = await tg.send_text(chat, ANN, "/t2v one")
        await delivered(stack, first)
        second = await tg.send_text(chat, ANN, "/t2v two")
        status2 = await one_reply(tg, second)
        await tg.wait_for(lambda: tg.message(chat["id"], status2.result["message_id"])["text"] != "⏳ Submitting…")
        assert "today's 1 videos" in tg.message(chat["id"], status2.result["message_id"])["text"]
        assert len(await stack.jobs_of(ANN["id"])) == 1

        # /forget asks first; only Ann's button works for Ann's data.
        ask = await tg.send_text(chat, ANN, "/forget")
        confirm = await one_reply(tg, ask)
        confirm_msg = tg.message(chat["id"], confirm.result["message_id"])
        assert buttons(confirm_msg) == [f"forget:{ANN['id']}", f"keep:{ANN['id']}"]
        qid = await tg.click(BOB, confirm_msg, f"forget:{ANN['id']}")
        await tg.wait_for(lambda: qid in tg.callback_answers)
        assert tg.callback_answers[qid].get("show_alert") == "true"
        assert len(await stack.jobs_of(ANN["id"])) == 1
        await tg.click(ANN, confirm_msg, f"forget:{ANN['id']}")
        await tg.wait_for(lambda: "deleted 1 job" in tg.message(chat["id"], confirm_msg["message_id"])["text"])
        assert await stack.jobs_of(ANN["id"]) == []


async def test_token_never_reaches_the_logs_even_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_stack(tmp_path) as stack:
        logging.getLogger("httpx").setLevel(logging.DEBUG)  # an operator turning everything up
        try:
            tg = stack.tg
            chat = tg.private_chat(ANN)
            cmd = await tg.send_text(chat, ANN, "/t2v a quiet forest")
            await delivered(stack, cmd)
        finally:
            logging.getLogger("httpx").setLevel(logging.WARNING)
    text = caplog.text
    assert TOKEN not in text and TOKEN.split(":")[1] not in text
    assert "[redacted]" in text  # PTB and httpx did log URLs with the token: they were redacted
    assert any(r.name.startswith("httpx") for r in caplog.records)


async def test_webhook_mode(tmp_path: Path, unused_tcp_port: int) -> None:
    import aiohttp

    async with FakeTelegram(TOKEN) as tg:
        settings = make_settings(
            tmp_path, tg,
            telegram={"mode": "webhook", "webhook_url": "https://bot.example.org/tg/hook",
                      "webhook_listen": "127.0.0.1", "webhook_port": unused_tcp_port},
        )
        stack = await Stack(tg, settings).start()
        try:
            (hook,) = await tg.wait_call("setWebhook")
            assert hook.params["url"] == "https://bot.example.org/tg/hook"
            secret = hook.params["secret_token"]
            chat = tg.private_chat(ANN)
            cmd = tg._new_message(chat, ANN, text="/t2v a windmill", entities=tg._command_entities("/t2v a"))
            url = f"http://127.0.0.1:{unused_tcp_port}/tg/hook"
            async with aiohttp.ClientSession() as http:
                async with http.post(url, json={"update_id": 1, "message": cmd}) as resp:
                    assert resp.status == 403  # no secret header: refused
                async with http.post(url, json={"update_id": 2, "message": cmd},
                                     headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as resp:
                    assert resp.status == 200
            await delivered(stack, cmd)
            assert len(await stack.jobs_of(ANN["id"])) == 1
        finally:
            await stack.stop()


async def test_too_big_results_are_re_encoded_or_sent_as_a_preview(tmp_path: Path) -> None:
    pytest.importorskip("generator.media")
    # The "big" test video is ~330 kB: a 200 kB limit needs a re-encode; 300 bytes (less than an mp4 header) never fits.
    async with running_stack(tmp_path, telegram={"max_upload_bytes": 200_000}) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v big noisy sea")
        video = await delivered(stack, cmd)
        (job,) = await stack.jobs_of(ANN["id"])
        assert job.output is not None and job.output.bytes > 200_000
        assert len(video.files["video"]) <= 200_000
        assert "Re-encoded" in tg.message(chat["id"], video.result["message_id"])["caption"]

    async with running_stack(tmp_path / "tiny", telegram={"max_upload_bytes": 300}) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v big noisy sea")
        preview = await one_reply(tg, cmd, "sendPhoto")
        caption = tg.message(chat["id"], preview.result["message_id"])["caption"]
        assert "too large to send" in caption and "Job #" in caption
        assert buttons(preview)[0].startswith("retry:")
        assert not tg.calls_of("sendVideo")


async def test_status_message_shows_each_phase_until_the_video_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status goes text -> sampling -> decoding -> encoding instead of sitting at 100% through the decode
    and the mp4 encode. The test engine waits in each gated phase until the test opens the gate."""
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(GATES_ENV, str(gates))  # inherited by the worker process
    async with running_stack(tmp_path) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)
        cmd = await tg.send_text(chat, ANN, "/t2v a tide coming in [phases] --steps 2")
        status = await submitted(tg, cmd)
        sid = status["message_id"]
        (job,) = await stack.jobs_of(ANN["id"])
        for words, gate in (("Encoding the prompt", "text"), ("Decoding the video", "decode"),
                            ("Encoding the mp4", "encode")):
            await tg.wait_for(lambda w=words: w in (tg.message(chat["id"], sid) or {}).get("text", ""))
            (gates / f"{job.id}-{gate}").touch()
        await delivered(stack, cmd)
        texts = [c.params["text"] for c in tg.calls_of("editMessageText") if c.params["message_id"] == sid]
        decoding = next(t for t in texts if "Decoding the video" in t)
        assert "(sampled 2/2 steps)" in decoding and "100%" not in decoding
        # (Sampling 2 fast steps may be coalesced away by the edit throttle: that is the throttle working.)
