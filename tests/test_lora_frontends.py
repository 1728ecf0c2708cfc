"""LoRA styles end to end through the three front ends: the real PTB client against the fake Bot API, the real
discord.py client against the fake Discord, and the web console over HTTP, each with the real Scheduler (temp
SQLite, a worker process with a fast test engine) and a synthetic LoRA file in the configured folder.

Each checks: a job with ``--lora NAME:0.8`` succeeds with the LoRA set stored and shown with the result,
``/loras`` lists the file with its description, Retry and Remix reproduce the set, and an unknown name gets the
friendly reply with close matches and makes no job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fakes.discord_harness import discord_env, job_id_of
from fakes.telegram_server import FakeTelegram
from fakes.telegram_stack import one_reply, running_stack, submitted
from web_support import console, mp4_env

from generator.scheduler.api import Requester
from tests.test_lora import write_lora

ANN = FakeTelegram.user(1001, "Ann")
DESCRIPTION = "Ink wash painting, soft brush edges"


def lora_folder(root: Path) -> dict[str, Any]:
    """A ``[loras]`` section whose folder holds ``ink_wash.safetensors`` (description in its metadata)."""
    folder = root / "styles"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    layers = {"blocks.0.attn1.to_q": (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))}
    write_lora(folder / "ink_wash.safetensors", layers, "wan", alpha=4.0, metadata={"description": DESCRIPTION})
    return {"folder": str(folder), "max_per_job": 2, "max_scale": 1.5}


async def test_telegram_lora_job_listing_retry_remix_and_unknown_name(tmp_path: Path) -> None:
    async with running_stack(tmp_path, loras=lora_folder(tmp_path)) as stack:
        tg = stack.tg
        chat = tg.private_chat(ANN)

        listing = await tg.send_text(chat, ANN, "/loras")
        text = (await one_reply(tg, listing)).params["text"]
        assert f"<code>ink_wash</code>: {DESCRIPTION}" in text and "up to 2, scale -1.5 to 1.5" in text

        cmd = await tg.send_text(chat, ANN, "/t2v a fox in snow --lora ink_wash:0.8 --seed 31")
        video = await one_reply(tg, cmd, "sendVideo")
        (job,) = await stack.jobs_of(ANN["id"])
        assert job.state == "succeeded" and job.request.loras == "ink_wash:0.8"
        result_msg = tg.message(chat["id"], video.result["message_id"])
        assert "LoRA styles: ink_wash 0.8" in result_msg["caption"]

        await tg.click(ANN, result_msg, f"retry:{job.id}")
        await tg.wait_for(lambda: len(tg.calls_of("sendVideo")) == 2)
        remix_cmd = await tg.send_text(chat, ANN, f"/remix {job.id} a fox in the rain")
        await one_reply(tg, remix_cmd, "sendVideo")
        jobs = {j.id: j for j in await stack.jobs_of(ANN["id"])}
        children = [j for j in jobs.values() if j.parent_id == job.id]
        assert sorted(j.lineage for j in children) == ["remix", "retry"]
        assert all(j.state == "succeeded" and j.request.loras == "ink_wash:0.8" for j in children)

        # The Params answer gives the set back as a flag to copy.
        await tg.click(ANN, result_msg, f"params:{job.id}")
        params = await tg.wait_call("sendMessage", lambda c: "Parameters of job" in c.params["text"])
        assert "--lora ink_wash:0.8" in params[0].params["text"]

        bad = await tg.send_text(chat, ANN, "/t2v a fox --lora ink_wsh")
        answer = (await submitted(tg, bad))["text"]
        assert "Unknown LoRA style 'ink_wsh'. Did you mean ink_wash?" in answer
        assert len(await stack.jobs_of(ANN["id"])) == 3


async def test_discord_lora_option_listing_retry_remix_and_unknown_name(tmp_path: Path) -> None:
    async with discord_env(tmp_path, loras=lora_folder(tmp_path)) as env:
        srv = env.server
        alice = srv.new_user("alice")
        requester = Requester("discord", alice["id"])

        answer = await env.private_answer(await srv.slash("loras", alice))
        assert f"`ink_wash`: {DESCRIPTION}" in answer and "up to 2" in answer

        # The typed slash option and the inline flag both work.
        iid = await srv.slash("t2v", alice, prompt="a fox in snow --seed 31", lora="ink_wash:0.8")
        first = await env.delivered(iid)
        job = await env.sched.views.get(job_id_of(first))
        assert job is not None and job.state == "succeeded" and job.request.loras == "ink_wash:0.8"
        assert "LoRA styles: ink\\_wash 0.8" in first["content"]
        inline = await env.delivered(await srv.slash("t2v", alice, prompt="a cat --lora Ink_Wash"))
        assert (await env.sched.views.get(job_id_of(inline))).request.loras == "ink_wash:1"  # type: ignore[union-attr]

        retried = await env.delivered(await srv.click(first["id"], f"tb:retry:{job.id}", alice))
        again = await env.sched.views.get(job_id_of(retried))
        assert again is not None and again.lineage == "retry" and again.request.loras == "ink_wash:0.8"

        # The Remix form is prefilled with the set; submitting it unchanged keeps it.
        click = await srv.click(first["id"], f"tb:remix:{job.id}", alice)
        await srv.wait_for(lambda: srv.response_of(click).acked)
        modal = srv.response_of(click).callback_data
        assert modal is not None
        prefilled = {c["custom_id"]: c.get("value") for row in modal["components"] for c in row["components"]}
        assert "--lora ink_wash:0.8" in prefilled["flags"]
        sid = await srv.submit_modal(click, alice, {"prompt": "a fox in the rain", "flags": prefilled["flags"]})
        remix = await env.sched.views.get(job_id_of(await env.delivered(sid)))
        assert remix is not None and remix.lineage == "remix" and remix.request.loras == "ink_wash:0.8"
        slashed = await env.delivered(await srv.slash("remix", alice, job=str(job.id), prompt="a fox at dawn"))
        child = await env.sched.views.get(job_id_of(slashed))
        assert child is not None and child.request.loras == "ink_wash:0.8" and child.seed == 31

        before = len(await env.sched.views.jobs_for(requester, limit=100))
        answer = await env.private_answer(await srv.slash("t2v", alice, prompt="a fox", lora="inkwash"))
        assert "Unknown LoRA style 'inkwash'. Did you mean ink_wash?" in answer
        assert len(await env.sched.views.jobs_for(requester, limit=100)) == before


async def test_web_lora_listing_job_retry_remix_and_unknown_name(tmp_path: Path) -> None:
    app = tmp_path / "app"
    env = mp4_env(tmp_path / "mp4")
    async with console(app, workers=True, worker_env=env, loras=lora_folder(app)) as c:
        await c.prime()
        options = await (await c.client.get("/api/options")).json()
        assert options["loras"] == {"styles": [{"name": "ink_wash", "description": DESCRIPTION}],
                                    "max_per_job": 2, "max_scale": 1.5}

        resp = await c.submit("a fox in snow", seed=31, steps=2, frames=5, loras="ink_wash:0.8")
        assert resp.status == 201, await resp.text()
        job_id = (await resp.json())["job"]["id"]
        done = await c.wait_state(job_id, ("succeeded",))
        assert done["params"]["loras"] == "ink_wash:0.8" and "LoRA styles: ink_wash 0.8" in done["caption"]

        retry = (await (await c.post_json(f"/api/jobs/{job_id}/retry", {"client_key": "retry-lora-01"})).json())["job"]
        remix = (await (await c.post_json(f"/api/jobs/{job_id}/remix",
                                          {"prompt": "a fox in the rain", "options": {}})).json())["job"]
        for child in (retry, remix):
            finished = await c.wait_state(child["id"], ("succeeded",))
            assert finished["params"]["loras"] == "ink_wash:0.8" and "LoRA styles: ink_wash 0.8" in finished["caption"]
        assert (retry["lineage"], remix["lineage"]) == ("retry", "remix")

        resp = await c.submit("a fox", steps=2, frames=5, loras="ink-wash")
        body = await resp.json()
        assert resp.status == 400 and "Did you mean ink_wash?" in body["message"], body
        listed = await (await c.client.get("/api/jobs")).json()
        assert len(listed["jobs"]) == 3


async def test_web_lora_job_on_the_real_tiny_engine_changes_the_video(tmp_path: Path) -> None:
    """The console with the real engine (embedded tiny model) in the worker: the LoRA is applied (same seed,
    another video), and a corrupt file in the folder fails only the job that asks for it, naming the file."""
    from generator.engine.tiny import tiny_transformer_config
    from generator.engine.transformer import build_transformer

    app = tmp_path / "app"
    folder = app / "styles"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_transformer(tiny_transformer_config("tiny-t2v"), attention="dense")
    g = torch.Generator().manual_seed(0)
    layers = {name: (torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g))
              for name, m in model.named_modules() if name.startswith("blocks.") and name.endswith("ffn.net.2")}
    write_lora(folder / "bold.safetensors", layers, "kohya", alpha=4.0, metadata={"description": "Bold strokes"})
    (folder / "broken.safetensors").write_bytes(b"garbage")
    async with console(app, workers=True, engine_factory=None,  # type: ignore[arg-type]
                       engine={"device": "cpu", "compile": False}, loras={"folder": str(folder)},
                       quotas={"max_queued_per_user": 10}) as c:
        await c.prime()
        ids = []
        for loras in ("", "bold:1.5", "broken"):
            resp = await c.submit("a fox", seed=5, steps=1, frames=5, loras=loras)
            assert resp.status == 201, await resp.text()
            ids.append((await resp.json())["job"]["id"])
        plain, styled = [await c.wait_state(j, ("succeeded", "failed"), limit=120) for j in ids[:2]]
        assert plain["state"] == styled["state"] == "succeeded", (plain["error_message"], styled["error_message"])
        assert plain["output"]["sha256"] != styled["output"]["sha256"]
        assert "LoRA styles: bold 1.5" in styled["caption"]
        broken = await c.wait_state(ids[2], ("succeeded", "failed"), limit=60)
        assert broken["state"] == "failed" and "broken.safetensors" in broken["error_message"]
