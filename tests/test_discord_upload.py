"""Results larger than the upload limit: re-encoded to fit, else a first-frame preview and a clear note."""

from __future__ import annotations

from pathlib import Path

from fakes.discord_harness import discord_env, file_bytes, job_id_of

from bots.discord.media import UPLOAD_HEADROOM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


async def test_results_over_the_upload_limit(tmp_path: Path) -> None:
    async with discord_env(tmp_path) as env:
        srv = env.server
        alice = srv.new_user("alice")

        # 1. The fast engine's noise video is ~100 KB; this channel allows a bit more than half of that.
        limit = UPLOAD_HEADROOM + 60_000
        iid = await srv.slash("t2v", alice, prompt="static on an old television", frames=17, size_limit=limit)
        final = await env.delivered(iid, within=60)
        job = await env.sched.views.get(job_id_of(final))
        assert job is not None and job.output is not None
        original = file_bytes(job.output.path)
        assert len(original) > limit  # the scenario really needs the re-encode
        sent = srv.file_bytes(final["attachments"][0])
        assert is_mp4(sent) and len(sent) <= limit - UPLOAD_HEADROOM and sent != original
        assert "Re-encoded smaller" in final["content"]
        assert file_bytes(job.output.path) == original  # the stored result is untouched

        # 2. No video can fit in 600 bytes: a first-frame preview and a note saying why.
        iid = await srv.slash("t2v", alice, prompt="[flat] a grey wall", size_limit=UPLOAD_HEADROOM + 600)
        final = await env.delivered(iid, within=60)
        att = final["attachments"][0]
        assert att["filename"].endswith("-preview.png") and srv.file_bytes(att).startswith(PNG_MAGIC)
        assert "first frame" in final["content"] and "upload limit" in final["content"]
        assert f"job #{job_id_of(final)}" in final["content"]

        # 3. Discord announced 10 MiB but refuses anything over 1 KB (the server lost its boost meanwhile).
        srv.upload_cap = 1024
        iid = await srv.slash("t2v", alice, prompt="[flat] a grey sky")
        final = await env.delivered(iid, within=60)
        assert final["attachments"][0]["filename"].endswith("-preview.png")
        refused = [r for r in srv.requests if r.status == 413 and f"itoken-{iid}" in r.path]
        videos = [r for r in refused if len(r.files) == 1 and r.files[0].filename.endswith(".mp4")]
        # A live preview may have been refused too, once: after that the job's status edits carry none.
        previews = [r for r in refused if len(r.files) == 1 and r.files[0].filename == "preview.gif"]
        assert videos and len(previews) <= 1 and len(videos) + len(previews) == len(refused)

        # 4. Then it refuses anything over 100 bytes: not even the first frame goes; the caption and a note do.
        srv.upload_cap = 100
        iid = await srv.slash("t2v", alice, prompt="[flat] a grey sea")

        def captioned() -> dict[str, object] | None:
            msg = srv.original(iid)
            return msg if msg is not None and "upload limit" in msg["content"] else None

        final = await srv.wait_for(captioned, 60)
        assert not final["attachments"] and f"job #{job_id_of(final)}" in final["content"]
        assert "first frame" not in final["content"]
