"""Live previews on Discord, end to end: the real discord.py client against the fake Discord (which records
files uploaded by message edits), the real Scheduler and a worker process with the fast test engine. The
engine waits after each preview until the test opens that step's gate, so nothing depends on timing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.discord_engine import GATES_ENV
from fakes.discord_harness import discord_env, job_id_of


async def test_status_message_carries_the_preview_gif_until_the_video_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(GATES_ENV, str(gates))
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a comet over the sea [preview]", steps=3)
        status = await env.answered(iid)
        job_id = job_id_of(status)
        sid = status["id"]

        await srv.wait_for(lambda: any(m == sid for m, _, _ in srv.media_edits), 30)
        (_, name, first) = next(e for e in srv.media_edits if e[0] == sid)
        assert name == "preview.gif" and first[:6] == b"GIF89a"
        assert [a["filename"] for a in srv.messages[sid]["attachments"]] == ["preview.gif"]
        (gates / f"{job_id}-preview1").touch()

        await srv.wait_for(lambda: len([e for e in srv.media_edits if e[0] == sid]) >= 2, 30)
        second = [e for e in srv.media_edits if e[0] == sid][1][2]
        assert second[:6] == b"GIF89a" and second != first
        assert len(srv.messages[sid]["attachments"]) == 1  # replaced, not piled up
        (gates / f"{job_id}-preview2").touch()

        final = await env.delivered(iid)
        assert f"Job #{job_id}" in final["content"]
        names = [a["filename"] for a in srv.messages[sid]["attachments"]]
        assert "preview.gif" not in names and any(n.endswith(".mp4") for n in names)


async def test_no_preview_attachment_when_turned_off(tmp_path: Path) -> None:
    async with discord_env(tmp_path, scheduler={"previews": False}) as env:
        srv = env.server
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="a comet over the sea", steps=3)
        status = await env.answered(iid)
        await env.delivered(iid)
        shown = [a["filename"] for v in srv.history[status["id"]] for a in v["attachments"]]
        assert "preview.gif" not in shown
        assert not any(name == "preview.gif" for _, name, _ in srv.media_edits)


async def test_a_refused_preview_turns_previews_off_and_the_status_still_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Discord announced 10 MiB but refuses anything over 1 KB: the first preview edit gets a 413; the same
    edit is made again without the preview, no later edit carries one, and nothing is logged as an error."""
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(GATES_ENV, str(gates))
    async with discord_env(tmp_path) as env:
        srv = env.server
        srv.upload_cap = 1024
        alice = srv.new_user("alice")
        iid = await srv.slash("t2v", alice, prompt="[flat] a comet over the sea [preview]", steps=3)
        status = await env.answered(iid)
        job_id = job_id_of(status)
        sid = status["id"]

        def refused_previews() -> list[object]:
            return [r for r in srv.requests if r.status == 413 and sid in r.path
                    and any(f.filename == "preview.gif" for f in r.files)]

        await srv.wait_for(lambda: refused_previews(), 30)
        # The text of that edit still lands (step 1 of 3), without an attachment.
        await srv.wait_for(lambda: "1/3" in srv.messages[sid]["content"], 30)
        assert not srv.messages[sid]["attachments"]
        (gates / f"{job_id}-preview1").touch()
        (gates / f"{job_id}-preview2").touch()
        final = await env.delivered(iid, within=60)  # a first frame of one colour fits in 1 KB
        assert final["attachments"][0]["filename"].endswith("-preview.png")
        assert len(refused_previews()) == 1
        assert not any(name == "preview.gif" for _, name, _ in srv.media_edits)
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
