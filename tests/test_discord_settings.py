"""/settings and moderation through the real discord.py client against the fake Discord server: a member
without Manage Server is refused, an admin's default applies to the next job, bot off and channel limits
refuse, a blocked prompt is refused without echo, and age-restricted prompts pass only in NSFW channels."""

from __future__ import annotations

from pathlib import Path

from fakes.discord_harness import discord_env
from fakes.discord_server import ADMIN_PERMISSIONS
from sqlalchemy import select

from generator.scheduler.api import Requester
from storage.models import AuditLog


async def test_settings_need_manage_server_and_apply(tmp_path: Path) -> None:
    words = tmp_path / "nsfw.txt"
    words.write_text("lewd\n", encoding="utf-8")
    block = tmp_path / "block.txt"
    block.write_text("dragon\n", encoding="utf-8")
    async with discord_env(tmp_path, workers=False, moderation={
            "blocklist_file": str(block), "nsfw_words_file": str(words)}) as env:
        srv = env.server
        alice, boss = srv.new_user("alice"), srv.new_user("boss")
        cmd = next(c for c in srv.guild_commands[srv.guild_id] if c["name"] == "settings")
        assert int(cmd["default_member_permissions"]) == 0x20  # Manage Server

        # A member without Manage Server (a crafted payload: the client would hide the command) is refused.
        iid = await srv.slash("settings", alice, defaults="--steps 1")
        assert "Manage Server" in await env.private_answer(iid)
        assert (await env.sched.communities.get("discord", srv.guild_id)).defaults == {}

        # The admin sets a default; the next job uses it, an explicit option still wins.
        iid = await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS, defaults="--steps 1 --ar 9:16")
        answer = await env.private_answer(iid)
        assert "Steps=1" in answer or "steps=1" in answer.lower(), answer
        await env.answered(await srv.slash("t2v", alice, prompt="a red fox"))
        await env.answered(await srv.slash("t2v", alice, prompt="a grey wolf", steps=2))
        jobs = await env.sched.views.jobs_for(Requester("discord", alice["id"]))
        by_prompt = {j.request.prompt: j.request for j in jobs}
        assert by_prompt["a red fox"].steps == 1 and by_prompt["a red fox"].aspect == "9:16"
        assert by_prompt["a grey wolf"].steps == 2
        # The ceiling: a default outside the configured limits is refused.
        iid = await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS, defaults="--steps 9")
        assert "Steps" in await env.private_answer(iid)

        # A blocked prompt: refused privately, without echoing it.
        iid = await srv.slash("t2v", alice, prompt="a d r 4 g o n over the sea")
        answer = await env.private_answer(iid)
        assert "blocked" in answer and "d r 4" not in answer and "sea" not in answer

        # Age-restricted: blocked by default; "nsfw_channels" lets it through in an NSFW channel only.
        assert "Age-restricted" in await env.private_answer(await srv.slash("t2v", alice, prompt="a l3wd scene"))
        await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS,
                                                 policy="nsfw_channels"))
        iid = await srv.slash("t2v", alice, prompt="a lewd scene")
        assert "outside age-restricted channels" in await env.private_answer(iid)
        await env.answered(await srv.slash("t2v", alice, nsfw=True, prompt="a lewd scene"))

        # Only in some channels, then bot off.
        other = "123456789012345678"
        iid = await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS, channels=f"<#{other}>")
        assert f"<#{other}>" in await env.private_answer(iid)
        iid = await srv.slash("t2v", alice, prompt="a cat")
        assert f"only be made in <#{other}>" in await env.private_answer(iid)
        await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS, channels="all",
                                                 bot_on=False))
        iid = await srv.slash("t2v", alice, prompt="a cat")
        assert "switched off" in await env.private_answer(iid)

        async with env.sched.db.read() as s:
            actions = [r.action for r in (await s.execute(select(AuditLog))).scalars()]
        assert actions.count("community_settings") == 4 and "blocked_prompt" in actions and "nsfw_prompt" in actions


async def test_settings_expand_option_follows_the_global_ceiling(tmp_path: Path) -> None:
    async with discord_env(tmp_path / "bare", workers=False) as env:
        srv = env.server
        boss = srv.new_user("boss")
        answer = await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS, expand="on"))
        assert "not offered by this bot" in answer
    async with discord_env(tmp_path / "full", workers=False,
                           expand={"url": "http://127.0.0.1:9/v1/chat/completions"}) as env:
        srv = env.server
        boss = srv.new_user("boss")
        answer = await env.private_answer(await srv.slash("settings", boss, permissions=ADMIN_PERMISSIONS,
                                                          defaults="clear", expand="on"))
        assert "prompt expansion: on (this community’s default" in answer
        assert (await env.sched.communities.get("discord", srv.guild_id)).defaults == {"expand": True}
