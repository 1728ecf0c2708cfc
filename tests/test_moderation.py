"""Prompt moderation: the matching table (evasions caught, innocent words kept), the list file reloaded on
change, and the scheduler's submit refusing a blocked prompt (also on remix) without echoing it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from scheduler_support import make_db, make_settings, t2v, where, who
from sqlalchemy import select

from generator.scheduler.api import Refusal
from generator.scheduler.moderation import WordList, normalise
from generator.scheduler.service import Scheduler
from storage.models import AuditLog

LIST = ("ass", "bad", "forbidden thing")

BLOCKED = [
    "ass", "ASS", "a s s", "a.s.s", "a-s-s", "a_s_s", "@$$", "a55", "4ss", "a$$", "so @ss here",
    "b a d", "b.a.d", "B-A-D", "b4d", "bäd", "ｂａｄ", "bаd",  # Cyrillic а
    "βad",  # Greek beta for b
    "a forbidden thing", "FORBIDDEN   THING", "forbidden-thing", "f0rb1dden th1ng", "forbiddenthing",
    "ƒorbidden thing".replace("ƒ", "f"), "fórbídden thíng", "a bad, sad day", "(bad)", "bad!",
]
ALLOWED = [
    "class", "a class act", "bass guitar", "assassin", "glass", "passage", "badge", "badminton", "sinbad",
    "a forbidden city", "thing", "forbidden", "abad", "a sad day", "a small", "has some", "1080p 4k render",
    "was sad", "",
]


@pytest.mark.parametrize("text", BLOCKED)
def test_evasions_are_caught(text: str) -> None:
    assert WordList(fixed=LIST).match(text) is not None, text


@pytest.mark.parametrize("text", ALLOWED)
def test_innocent_words_pass(text: str) -> None:
    assert WordList(fixed=LIST).match(text) is None, text


def test_normalise() -> None:
    assert normalise("Ｃａｆé ΑΒС") == "cafe abc"  # fullwidth, accent, Greek capitals, Cyrillic С


def _rewrite(path: Path, text: str, bump: int) -> None:
    path.write_text(text, encoding="utf-8")
    st = path.stat()  # a new mtime even when the rewrite falls within the filesystem's time granularity
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_list_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    wl = WordList(fixed=("fixedword",), path=path)
    assert wl.match("a dragon") is None and wl.match("fixedword") == "fixedword"  # no file yet: fixed only
    _rewrite(path, "# comment\ndragon\n\n  lava flow  # phrase\n", 1)
    assert wl.match("a D R A G O N") == "dragon" and wl.match("l4va-flow") == "lava flow"
    assert wl.match("fixedword") == "fixedword"
    _rewrite(path, "volcano\n", 2)
    assert wl.match("a dragon") is None and wl.match("v0lcan0") == "volcano"
    path.unlink()
    assert wl.match("volcano") is None and wl.match("fixedword") == "fixedword"


async def test_submit_and_remix_refuse_a_blocked_prompt_without_echo(tmp_path: Path) -> None:
    listfile = tmp_path / "words.txt"
    listfile.write_text("dragon\n", encoding="utf-8")
    settings = make_settings(tmp_path, moderation={"blocklist_file": str(listfile)},
                             admin={"blocked_words": ["forbidden thing"]})
    db = await make_db(settings)
    sched = Scheduler(settings, db=db)
    await sched.start(run_workers=False)
    try:
        for i, prompt in enumerate(["a d.r.a.g.o.n flies", "a f0rbidden th1ng"]):
            with pytest.raises(Refusal) as info:
                await sched.jobs.submit(t2v(prompt), who(1), where("c9"), f"k{i}")
            assert info.value.code == "blocked_words"
            assert "blocked" in info.value.message and "dr" not in info.value.message.lower()
        ok = await sched.jobs.submit(t2v("a red fox"), who(1), where("c9"), "ok")
        with pytest.raises(Refusal) as info:  # a remix with a new prompt goes through the same check
            await sched.jobs.remix(ok.job.id, who(1), where("c9"), "r1", overrides={"prompt": "DRAGON!"})
        assert info.value.code == "blocked_words"
        _rewrite(listfile, "fox\n", 1)  # reloaded without a restart
        with pytest.raises(Refusal):
            await sched.jobs.submit(t2v("a red fox"), who(1), where("c9"), "fox2")
        async with db.read() as s:
            rows = list((await s.execute(select(AuditLog).where(AuditLog.action == "blocked_prompt"))).scalars())
        details = [json.loads(r.detail) for r in rows]
        assert [d["entry"] for d in details] == ["dragon", "forbidden thing", "dragon", "fox"]
        assert details[0]["who"] == "test:1" and details[0]["where"] == "test:c9"
        assert details[0]["prompt"] == "a d.r.a.g.o.n flies" and all(r.user_id is not None for r in rows[2:])
    finally:
        await sched.stop()
        await db.dispose()
