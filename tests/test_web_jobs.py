"""Console jobs end to end with the real Scheduler and a worker process (fast test engine): live status over
server-sent events, the finished video served with Range support, Retry / Remix / Cancel, metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from web_support import Console, console, mp4_env


async def read_events(c: Console, job_id: int) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    async with c.client.get(f"/api/jobs/{job_id}/events", timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


async def test_live_status_video_remix_retry_cancel_and_metrics(tmp_path: Path) -> None:
    env = mp4_env(tmp_path / "mp4", TURBOBOT_TEST_STEP_SECONDS="0.05")
    async with console(tmp_path / "app", workers=True, worker_env=env) as c:
        await c.prime()
        resp = await c.submit("a red fox running", seed=1234, steps=3, frames=5)
        assert resp.status == 201, await resp.text()
        job_id = (await resp.json())["job"]["id"]

        events = await read_events(c, job_id)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "end" and kinds.count("end") == 1
        jobs = [d for k, d in events if k == "job"]
        states = [j["state"] for j in jobs]
        assert states[-1] == "succeeded" and "queued" not in states[states.index("succeeded"):]
        assert states == sorted(states, key=["queued", "running", "succeeded"].index)  # never goes back
        steps = [j["progress"]["step"] for j in jobs if j["state"] == "running"]
        assert steps == sorted(steps) and any(s > 0 for s in steps)  # step progress was streamed
        done = jobs[-1]
        assert done["seed"] == 1234 and done["output"]["url"] == f"/media/jobs/{job_id}/video.mp4"
        assert done["output"]["is_demo"] and done["demo_note"]
        assert f"Job #{job_id} · seed 1234" in done["caption"]

        video = await c.client.get(done["output"]["url"])
        data = await video.read()
        assert video.status == 200 and video.headers["Accept-Ranges"] == "bytes"
        assert data[4:8] == b"ftyp" and len(data) == done["output"]["bytes"]
        part = await c.client.get(done["output"]["url"], headers={"Range": "bytes=4-7"})
        assert part.status == 206 and await part.read() == b"ftyp"

        # Remix: same seed, new prompt; Retry: same parameters, new seed.
        resp = await c.post_json(f"/api/jobs/{job_id}/remix", {"prompt": "a red fox in the rain", "options": {}})
        remix = (await resp.json())["job"]
        assert resp.status == 201 and remix["seed"] == 1234 and remix["parent_id"] == job_id
        resp = await c.post_json(f"/api/jobs/{job_id}/retry", {"client_key": "retry-0001-key"})
        retry = (await resp.json())["job"]
        assert retry["seed"] != 1234 and retry["params"]["steps"] == 3
        assert (remix["lineage"], retry["lineage"]) == ("remix", "retry")
        for jid, word in ((remix["id"], "Remix"), (retry["id"], "Retry")):
            finished = await c.wait_state(jid, ("succeeded",))
            assert finished["output"] is not None and f"{word} of job #{job_id}" in finished["caption"]
        # Extend: one mp4 of the parent followed by the new frames; a queued job cannot be extended.
        resp = await c.post_json(f"/api/jobs/{job_id}/extend", {"client_key": "extend-0001-key"})
        ext = (await resp.json())["job"]
        assert resp.status == 201 and ext["lineage"] == "extend" and ext["seed"] == 1234 and ext["mode"] == "i2v"
        finished = await c.wait_state(ext["id"], ("succeeded",))
        assert finished["output"]["frames"] == 9 and f"Extension of job #{job_id}" in finished["caption"]
        page = await c.job(job_id)
        assert sorted(ch["id"] for ch in page["children"]) == sorted([remix["id"], retry["id"], ext["id"]])

        # Cancel: a job holding the worker (running) and one waiting behind it (queued).
        hold = (await (await c.submit("hold the worker", frames=5, steps=2)).json())["job"]
        await c.wait_state(hold["id"], ("running",))
        waiting = (await (await c.submit("a queued fox", frames=5, steps=1)).json())["job"]
        assert (await c.job(waiting["id"]))["job"]["state"] == "queued"
        resp = await c.post_json(f"/api/jobs/{waiting['id']}/cancel")
        assert resp.status == 200 and (await resp.json())["job"]["state"] == "cancelled"
        resp = await c.post_json(f"/api/jobs/{hold['id']}/cancel")
        assert resp.status == 200
        assert (await c.wait_state(hold["id"], ("cancelled",)))["state"] == "cancelled"

        # A job that already finished streams its final state at once.
        again = await read_events(c, job_id)
        assert [k for k, _ in again] == ["job", "end"]

        text = await (await c.client.get("/metrics")).text()
        metric = dict(re.findall(r"^(turbobot_[^ ]+) ([0-9.e+-]+)$", text, flags=re.M))
        assert float(metric['turbobot_jobs_finished_total{mode="t2v",platform="web",state="succeeded"}']) == 3
        assert float(metric['turbobot_jobs_finished_total{mode="t2v",platform="web",state="cancelled"}']) == 2
        assert float(metric['turbobot_jobs_finished_total{mode="i2v",platform="web",state="succeeded"}']) == 1  # Extend
        assert float(metric["turbobot_job_run_seconds_count"]) == 4
        assert float(metric["turbobot_job_end_to_end_seconds_count"]) == 4
        assert float(metric["turbobot_job_queue_wait_seconds_count"]) >= 4
        assert float(metric['turbobot_queue_depth{state="queued"}']) == 0
        assert float(metric["turbobot_gpu_seconds_total"]) > 0
        workers = {k: float(v) for k, v in metric.items() if k.startswith("turbobot_workers{")}
        assert sum(workers.values()) == 1 and 'turbobot_workers{state="stale"}' not in workers
        assert float(metric["turbobot_worker_restarts_total"]) == 0
        assert float(metric["turbobot_oom_total"]) == 0
        # Scraping again counts nothing twice.
        text2 = await (await c.client.get("/metrics")).text()
        assert 'turbobot_jobs_finished_total{mode="t2v",platform="web",state="succeeded"} 3.0' in text2
        assert "operator" not in text2

        overview = await (await c.client.get("/api/admin/overview")).json()
        history = overview["step_history"]
        assert [h["job_id"] for h in history] == [job_id, remix["id"], retry["id"], ext["id"]]
        assert all(h["step_mean"] > 0.04 for h in history)  # 0.05 s per step in the test engine

        ready = await c.client.get("/readyz")
        assert ready.status == 200, await ready.text()
