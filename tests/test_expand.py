"""Prompt expansion against a fake OpenAI-compatible endpoint on 127.0.0.1: a good answer is stored and shown,
a slow, failing, malformed or empty answer falls back to the prompt as typed within the timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from scheduler_support import make_db, make_settings, t2v, where, who

from bots.texts import params_text, result_caption
from generator.scheduler.expand import expand_prompt, needs_expansion
from generator.scheduler.service import Scheduler
from turbobot.config import ConfigError, ExpandSettings, settings_from_dict

RICH = ("A small red fox trots through fresh powder snow at dusk, warm golden backlight, soft breath vapor, "
        "the camera tracks low beside it, shallow depth of field, cinematic")


class FakeLLM:
    """A chat-completions endpoint whose behaviour the test picks: ok, slow, 500, malformed, empty, nochoices."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: list[tuple[dict[str, Any], str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append((body, request.headers.get("Authorization", "")))
        if self.mode == "slow":
            try:  # "30 s", or until the server stops
                await asyncio.wait_for(self._stopping.wait(), 30)
            except TimeoutError:
                pass
        if self.mode == "500":
            return web.Response(status=500, text="model crashed")
        if self.mode == "malformed":
            return web.Response(text='{"choices": [ {"message": ', content_type="application/json")
        if self.mode == "nochoices":
            return web.json_response({"error": "nope"})
        content = {"ok": f'"{RICH}"', "empty": "", "long": "word " * 2000}[self.mode]
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    await fake.start()
    yield fake
    await fake.stop()


def _cfg(url: str, **kw: Any) -> ExpandSettings:
    return ExpandSettings(url=url, model="tiny-llm", timeout_seconds=kw.pop("timeout_seconds", 1.0), **kw)


async def test_a_good_answer_is_used_and_the_request_is_well_formed(llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOT_EXPAND_API_KEY", "sk-local")
    out = await expand_prompt(_cfg(llm.url, system_prompt="SYS"), "ein Fuchs im Schnee", 800)
    assert out == RICH  # surrounding quotes stripped
    body, auth = llm.calls[0]
    assert body["model"] == "tiny-llm" and auth == "Bearer sk-local"
    assert body["messages"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "ein Fuchs im Schnee"}]


@pytest.mark.parametrize("mode", ["500", "malformed", "empty", "nochoices"])
async def test_failures_fall_back_to_the_prompt_as_typed(llm: FakeLLM, mode: str) -> None:
    llm.mode = mode
    assert await expand_prompt(_cfg(llm.url), "a fox", 800) is None
    assert len(llm.calls) == 1


async def test_slow_endpoint_is_cut_at_the_timeout(llm: FakeLLM) -> None:
    llm.mode = "slow"
    t0 = time.monotonic()
    assert await expand_prompt(_cfg(llm.url, timeout_seconds=0.5), "a fox", 800) is None
    assert time.monotonic() - t0 < 5.0  # the 30 s answer was not waited for


async def test_endpoint_down_and_overlong_answers(llm: FakeLLM) -> None:
    assert await expand_prompt(_cfg("http://127.0.0.1:9/v1/chat/completions"), "a fox", 800) is None
    llm.mode = "long"
    out = await expand_prompt(_cfg(llm.url), "a fox", 100)
    assert out is not None and len(out) <= 100 and not out.endswith(" ")


def test_which_prompts_are_rewritten() -> None:
    assert needs_expansion("a fox", 25)
    assert needs_expansion(" ".join(["Fuchs"] * 30) + " über", 25)  # non-English letters
    assert not needs_expansion(RICH + " " + RICH, 25)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"expand\.url"):
        settings_from_dict({"defaults": {"expand": True}})
    with pytest.raises(ConfigError, match=r"expand\.timeout_seconds"):
        settings_from_dict({"expand": {"url": "http://x/v1", "timeout_seconds": 0}})
    with pytest.raises(ConfigError, match="api_key_env"):  # no key in the file: only the variable's name
        settings_from_dict({"expand": {"api_key": "sk-123"}})


async def _sched(tmp_path: Path, url: str, wait_s: float = 1.0) -> Scheduler:
    settings = make_settings(tmp_path, expand={"url": url, "timeout_seconds": wait_s},
                             quotas={"max_queued_per_user": 10})
    sched = Scheduler(settings, db=await make_db(settings))
    await sched.start(run_workers=False)
    return sched


async def test_submission_stores_shows_and_remixes_from_the_expanded_prompt(tmp_path: Path, llm: FakeLLM) -> None:
    sched = await _sched(tmp_path, llm.url)
    try:
        res = await sched.jobs.submit(t2v("ein Fuchs", expand=True), who(1), where(), "k1")
        job = res.job
        assert job.request.prompt == RICH and job.request.original_prompt == "ein Fuchs"
        assert "Expanded from: ein Fuchs" in result_caption(job) and RICH[:60] in result_caption(job)
        assert "Expanded from: ein Fuchs" in params_text(job)
        again = await sched.jobs.submit(t2v("ein Fuchs", expand=True), who(1), where(), "k1")  # repeated click
        assert again.duplicate and len(llm.calls) == 1
        # Remix starts from the expanded prompt (already detailed English: not sent again).
        remix = await sched.jobs.remix(job.id, who(1), where(), "k2", overrides={"steps": 2})
        assert remix.job.request.prompt == RICH and remix.job.request.original_prompt == "ein Fuchs"
        assert len(llm.calls) == 1
        # --no-expand: the endpoint is not asked.
        plain = await sched.jobs.submit(t2v("a cat", expand=False), who(1), where(), "k3")
        assert plain.job.request.prompt == "a cat" and plain.job.request.original_prompt is None
        assert len(llm.calls) == 1
        # A crafted original_prompt on a new submission is not trusted.
        crafted = await sched.jobs.submit(t2v("a dog", original_prompt="lies"), who(1), where(), "k4")
        assert crafted.job.request.original_prompt is None
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_slow_or_broken_endpoint_never_loses_the_job(tmp_path: Path, llm: FakeLLM) -> None:
    sched = await _sched(tmp_path, llm.url, wait_s=0.5)
    try:
        llm.mode = "slow"
        t0 = time.monotonic()
        res = await sched.jobs.submit(t2v("a fox", expand=True), who(1), where(), "s1")
        assert time.monotonic() - t0 < 5.0
        assert res.job.state == "queued" and res.job.request.prompt == "a fox"
        assert res.job.request.original_prompt is None
        llm.mode = "malformed"
        res = await sched.jobs.submit(t2v("a bird", expand=True), who(1), where(), "s2")
        assert res.job.request.prompt == "a bird"
    finally:
        await sched.stop()
        await sched.db.dispose()


async def test_community_default_for_expansion_under_the_global_ceiling(tmp_path: Path, llm: FakeLLM) -> None:
    from bots.commands import submit_text
    from bots.community import settings_text
    from generator.scheduler.api import DeliveryTarget, Refusal

    group, dm = DeliveryTarget("telegram", "-100123"), DeliveryTarget("telegram", "555")
    admin = who("boss", "telegram")
    # No endpoint configured: a community cannot switch expansion on (off is allowed, and means nothing).
    bare = make_settings(tmp_path / "bare")
    sched = Scheduler(bare, db=await make_db(bare))
    await sched.start(run_workers=False)
    try:
        with pytest.raises(Refusal, match="not offered by this bot"):
            await sched.communities.update(admin, "telegram", "-100123", {"defaults": {"expand": True}})
        view = await sched.communities.update(admin, "telegram", "-100123", {"defaults": {"expand": False}})
        assert "prompt expansion: not offered" in settings_text(view, "telegram")
    finally:
        await sched.stop()
        await sched.db.dispose()

    # The endpoint is configured and the bot's own default is on: the community turns it off, then on.
    settings = make_settings(tmp_path / "full", expand={"url": llm.url, "timeout_seconds": 2.0},
                             defaults={"expand": True}, quotas={"max_queued_per_user": 20})
    sched = Scheduler(settings, db=await make_db(settings))
    await sched.start(run_workers=False)

    async def prompt_of(text: str, target: DeliveryTarget, key: str) -> tuple[str, bool]:
        res = await submit_text(sched, settings, who(1, "telegram"), target, key, "t2v", text)
        return res.job.request.prompt, res.job.request.expand

    try:
        view = await sched.communities.get("telegram", "-100123")
        assert view.expand and "on (the bot’s own default" in settings_text(view, "telegram")
        view = await sched.communities.update(admin, "telegram", "-100123", {"defaults": {"expand": False}})
        assert not view.expand and "off (this community’s default" in settings_text(view, "telegram")
        assert await prompt_of("ein Fuchs", group, "c1") == ("ein Fuchs", False)  # the community's off
        assert await prompt_of("ein Fuchs --expand", group, "c2") == (RICH, True)  # the request's own switch wins
        assert await prompt_of("ein Hund", dm, "c3") == (RICH, True)  # outside a community: the bot's own default
        assert len(llm.calls) == 2
        await sched.communities.update(admin, "telegram", "-100123", {"defaults": {"expand": True}})
        assert await prompt_of("eine Katze", group, "c4") == (RICH, True)
        assert await prompt_of("eine Katze --no-expand", group, "c5") == ("eine Katze", False)
        # "default": back to the bot's own.
        view = await sched.communities.update(admin, "telegram", "-100123", {"defaults": {"expand": None}})
        assert "expand" not in view.defaults and view.expand
    finally:
        await sched.stop()
        await sched.db.dispose()


@pytest.mark.parametrize("flavor", ["plain", "telegram", "discord"])
def test_help_describes_lora_extend_and_expansion(flavor: str) -> None:
    from bots.texts import help_text

    text = help_text(flavor)
    for part in ("/loras", "--lora NAME[:SCALE]", "/extend", "Extend", "--expand", "--no-expand", "rewritten"):
        assert part in text, (part, text)
