"""The console in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against
the real server, Scheduler and a worker process: log in, submit a T2V job in the playground, watch its
progress, see the video load, remix it, cancel a queued job, use the admin page with and without the token."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moderation_support import models, moderation
from scheduler_support import ENGINE_SPEC
from web_support import TOKEN, TOKEN_ENV, console_settings, make_db, mp4_env, png_bytes

from bots.web import create_web_app, start_web
from generator.params import PARAMS
from generator.scheduler.service import Scheduler

__all__ = ["models"]  # the tiny classifiers' session fixture, imported so pytest finds it here

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]
WAIT_S = 20


class ConsoleThread:
    """Scheduler + worker + console served by ``start_web`` on a free port, in a thread with its own loop
    (selenium calls block, the server must keep running meanwhile)."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.sections = sections
        self.url = ""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        env = mp4_env(self.tmp / "mp4", TURBOBOT_TEST_STEP_SECONDS="0.3")
        styles = self.tmp / "app" / "styles"
        styles.mkdir(parents=True)
        (styles / "ink_wash.safetensors").write_bytes(b"")  # the test engine never reads it
        (styles / "ink_wash.txt").write_text("Ink wash <b>painting</b>\n")
        settings = console_settings(self.tmp / "app", admin={"blocked_words": ["forbiddenword"]},
                                    loras={"folder": str(styles)}, **self.sections)
        db = await make_db(settings)
        scheduler = Scheduler(settings, db=db, engine_factory=ENGINE_SPEC, worker_env=env)
        await scheduler.start(run_workers=True)
        runner, self.url = await start_web(create_web_app(settings, scheduler), "127.0.0.1", 0)
        self.ready.set()
        try:
            await self.stop_event.wait()
        finally:
            await runner.cleanup()
            await scheduler.stop()
            await db.dispose()

    def __enter__(self) -> ConsoleThread:
        self.thread.start()
        assert self.ready.wait(60), "console did not start"
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop and self.stop_event:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def test_console_in_a_real_browser(tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.05)
    js = browser.execute_script

    def current_id() -> int:
        return int(js("const c = document.getElementById('current-job'); return c ? c.dataset.jobId : 0"))

    def click(css: str) -> None:
        """Click what the selector names; live updates may re-render it meanwhile, so retry if stale."""

        def attempt(d: Any) -> bool:
            try:
                d.find_element(By.CSS_SELECTOR, css).click()
            except StaleElementReferenceException:
                return False
            return True

        wait.until(attempt)

    def text_of(css: str) -> str:
        return str(js("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css))

    def current_state_is(state: str) -> Any:
        return lambda d: d.execute_script(
            "const c = document.getElementById('current-job'); return c && c.dataset.state;"
        ) == state

    with ConsoleThread(tmp_path) as server:
        base = server.url

        # Admin without the token: sent to the login page, nothing of the admin page is shown.
        browser.get(base + "/admin")
        wait.until(lambda d: d.find_elements(By.ID, "login-form"))
        assert "/login" in browser.current_url and not browser.find_elements(By.ID, "queue-table")
        browser.find_element(By.ID, "token").send_keys("not-the-token-at-all")
        browser.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: d.find_element(By.ID, "login-error").is_displayed())
        assert "/login" in browser.current_url

        # With the token: the admin page, with the worker's engine status.
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: d.current_url.endswith("/admin"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#workers-table .worker-row"))
        assert "model: test" in browser.find_element(By.ID, "engine").text

        # Playground: every parameter is offered with its allowed values.
        browser.get(base + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#aspect option"))
        aspects = [o.text for o in Select(browser.find_element(By.ID, "aspect")).options]
        assert aspects == ["16:9", "9:16", "1:1", "4:3", "3:4"]
        assert [o.text for o in Select(browser.find_element(By.ID, "steps")).options] == ["1", "2", "3", "4"]
        # The console's /loras: each style with its description (as text, never as markup) under the field.
        styles = browser.find_element(By.CSS_SELECTOR, ".lora-list").text
        assert "ink_wash: Ink wash <b>painting</b>" in styles
        assert browser.find_element(By.ID, "loras").get_attribute("placeholder") == "ink_wash"
        js(
            """
            window.__seen = new Set(); window.__sawProgress = false;
            new MutationObserver(() => {
              const c = document.getElementById('current-job');
              if (!c) return;
              window.__seen.add(c.dataset.state);
              if (c.querySelector('progress.step-progress')) window.__sawProgress = true;
            }).observe(document.getElementById('current'), {subtree: true, childList: true, attributes: true});
            """
        )
        browser.find_element(By.ID, "prompt").send_keys("a red fox running through snow at dusk")
        Select(browser.find_element(By.ID, "steps")).select_by_visible_text("2")
        Select(browser.find_element(By.ID, "aspect")).select_by_visible_text("1:1")
        frames = browser.find_element(By.ID, "frames")
        frames.clear()
        frames.send_keys("5")
        browser.find_element(By.ID, "seed").send_keys("777")
        browser.find_element(By.ID, "submit").click()

        wait.until(lambda d: d.find_elements(By.ID, "current-job"))
        first = current_id()
        wait.until(current_state_is("succeeded"))
        assert js("return [...window.__seen]").count("running") == 1
        assert js("return window.__sawProgress") is True
        assert text_of("#current-job .seed") == "777"

        # The video element loads and plays the result.
        wait.until(lambda d: d.execute_script(
            "const v = document.querySelector('#current-job video');"
            "return v && v.readyState >= 1 && v.duration > 0 && !v.error;"
        ))
        js("document.querySelector('#current-job video').play()")
        wait.until(lambda d: d.execute_script("return document.querySelector('#current-job video').currentTime > 0"))
        src = js("return document.querySelector('#current-job video').currentSrc")
        assert src.endswith(f"/media/jobs/{first}/video.mp4")

        # Remix: same seed, new prompt, linked to its parent.
        click("#current-job .btn-remix")
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#current-job .remix-prompt"))
        remix_inputs = js("return [...document.querySelectorAll('#current-job .remix-form input')].map(i => i.name)")
        assert remix_inputs == [p.name for p in PARAMS if p.identity]  # the server's fields, not a list in the script
        prompt.clear()
        prompt.send_keys("a red fox running through rain")
        click("#current-job .btn-remix-submit")
        wait.until(lambda d: current_id() != first)
        remix = current_id()
        wait.until(current_state_is("succeeded"))
        card = text_of("#current-job")
        assert f"remix of #{first}" in card and text_of("#current-job .seed") == "777"
        assert "a red fox running through rain" in card

        # Image to video: upload a picture (checked and stored by the server) and animate it.
        picture = tmp_path / "input.png"
        picture.write_bytes(png_bytes(80, 48))
        browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=i2v]").find_element(By.XPATH, "..").click()
        wait.until(lambda d: d.find_element(By.ID, "image").is_displayed())
        browser.find_element(By.ID, "image").send_keys(str(picture))
        browser.find_element(By.ID, "prompt").clear()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: current_id() != remix)
        wait.until(current_state_is("succeeded"))
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#current-job img.input'); return i && i.naturalWidth === 80;"
        ))
        assert "i2v" in text_of("#current-job .meta")
        browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=t2v]").find_element(By.XPATH, "..").click()

        # Cancel a queued job: one job holds the worker, the next one waits and is cancelled.
        def submit(text: str) -> int:
            before = current_id()
            box = browser.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(text)
            browser.find_element(By.ID, "submit").click()
            wait.until(lambda d: current_id() != before)
            return current_id()

        hold = submit("hold the worker busy")
        wait.until(current_state_is("running"))
        queued = submit("a fox that waits its turn")
        wait.until(current_state_is("queued"))
        assert "Position in queue: #1" in text_of("#current-job")
        click("#current-job .btn-cancel")
        wait.until(current_state_is("cancelled"))

        # Admin queue: the running job is listed and cancelled from there.
        browser.get(base + "/admin")
        row = f'#queue .queue-row[data-job-id="{hold}"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
        assert not browser.find_elements(By.CSS_SELECTOR, f'#queue .queue-row[data-job-id="{queued}"]')
        click(row + " .btn-admin-cancel")
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
        wait.until(lambda d: "web:operator" in d.find_element(By.ID, "users").text)

        # Moderation page, linked from the admin page: a blocked prompt and a community's settings are listed.
        browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const form = new FormData(); form.append("mode", "t2v"); form.append("prompt", "a forbiddenword fox");
            Promise.all([TB.api("POST", "/api/jobs", form), TB.api("POST", "/api/admin/communities",
              {platform: "discord", community: "42", changes: {policy: "nsfw_channels"}})]).then(done);
            """)
        click("#moderation-link")
        blocked = '#moderation-queue .moderation-row[data-action="blocked_prompt"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, blocked))
        assert "a forbiddenword fox" in browser.find_element(By.CSS_SELECTOR, blocked).text
        assert "web:operator" in browser.find_element(By.CSS_SELECTOR, blocked).text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#communities .community-row[data-community="discord:42"]'))
        policy = Select(browser.find_element(By.CSS_SELECTOR, '#communities .community-row .policy-select'))
        assert policy.first_selected_option.get_attribute("value") == "nsfw_channels"

        # The job page shows the lineage of the remix.
        browser.get(f"{base}/jobs/{first}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#children .job-card[data-job-id="{remix}"]'))

        # Without the token again (cookies gone): the admin page is refused.
        browser.delete_all_cookies()
        browser.get(base + "/admin")
        wait.until(lambda d: d.find_elements(By.ID, "login-form"))
        assert not browser.find_elements(By.ID, "queue-table")

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # The only expected errors: the login attempt with a wrong token (401), the 401s of the
        # pages' API calls after the cookies were deleted; and the blocked prompt's 400 (moderation page).
        unexpected = [e for e in errors if "401" not in e["message"]
                      and not ("400" in e["message"] and "/api/jobs" in e["message"])]
        assert not unexpected, unexpected


def test_held_videos_released_and_deleted_in_the_browser(
    tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch, models: dict[str, Path]
) -> None:
    """Output moderation holds two videos; on the moderation page the operator releases one (it becomes the
    job's video) and deletes the other (after confirming)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    wait = WebDriverWait(browser, WAIT_S * 2, poll_frequency=0.2)

    def click(css: str) -> None:
        """The page re-renders its rows when it reloads the queue: retry a click that found a stale row."""

        def attempt(d: Any) -> bool:
            try:
                d.find_element(By.CSS_SELECTOR, css).click()
            except StaleElementReferenceException:
                return False
            return True

        wait.until(attempt)

    with ConsoleThread(tmp_path, moderation=moderation(models["nsfw"])) as server:
        base = server.url
        browser.get(base + "/login")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: "/login" not in d.current_url)
        browser.get(base + "/admin/moderation")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#moderation-queue tr"))
        ids = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const post = (prompt) => { const f = new FormData(); f.append("mode", "t2v"); f.append("prompt", prompt);
              f.append("frames", "5"); return TB.api("POST", "/api/jobs", f); };
            Promise.all([post("a red fox"), post("a grey cat")]).then((rs) => done(rs.map((r) => r.data.job.id)));
            """)
        row = '#moderation-queue .moderation-row[data-action="blocked_output"][data-job="{}"]'
        # The page refreshes itself every 10 s; ask it to reload now until both held videos are listed.
        wait.until(lambda d: d.execute_script(
            "load(); return document.querySelectorAll('#moderation-queue .btn-release').length") == 2)
        release, delete = (row.format(i) for i in ids)
        wait.until(lambda d: "a red fox" in d.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", release))
        click(release + " .btn-release")
        wait.until(lambda d: d.find_elements(
            By.CSS_SELECTOR, f'.moderation-row[data-action="released_output"][data-job="{ids[0]}"]'))
        assert not browser.find_elements(By.CSS_SELECTOR, release + " .btn-release")  # decided: no buttons
        click(delete + " .btn-held-delete")
        wait.until(expected_conditions.alert_is_present())
        browser.switch_to.alert.accept()
        wait.until(lambda d: d.find_elements(
            By.CSS_SELECTOR, f'.moderation-row[data-action="deleted_held"][data-job="{ids[1]}"]'))
        wait.until(lambda d: "web:operator" in d.execute_script(
            "return document.getElementById('moderation-queue').innerText"))

        states = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            Promise.all(arguments[0].map((id) => TB.api("GET", `/api/jobs/${id}`))).then(
              (rs) => done(rs.map((r) => [r.data.job.state, Boolean(r.data.job.output)])));
            """, ids)
        assert states == [["succeeded", True], ["failed", False]], states
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
