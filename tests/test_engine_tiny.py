"""The engine end to end on the embedded tiny models (the same code path as real weights), on the CPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator import media
from generator.engine import create_engine, i2v, rcm
from generator.engine import vae as vae_ops
from generator.engine.api import JobCancelled, OutOfMemory, Progress, RenderJob
from generator.engine.options import EngineOptions
from generator.engine.runtime import TurboEngine
from generator.request import GenerationRequest

FRAMES = 5  # the smallest valid clip keeps these tests fast; the default 81 frames is timed separately


@pytest.fixture(scope="module")
def engine() -> TurboEngine:
    eng = create_engine(EngineOptions(device="cpu"))
    assert isinstance(eng, TurboEngine)
    eng.load()
    return eng


def t2v(seed: int = 42, **kw: object) -> GenerationRequest:
    base: dict[str, object] = {"mode": "t2v", "prompt": "a red fox running through snow", "model": "tiny-t2v",
                               "frames": FRAMES, "seed": seed}
    return GenerationRequest(**{**base, **kw})  # type: ignore[arg-type]


def i2v_req(seed: int = 5, **kw: object) -> GenerationRequest:
    base: dict[str, object] = {"mode": "i2v", "prompt": "the boat drifts", "model": "tiny-i2v", "image": "x" * 64,
                               "frames": FRAMES, "seed": seed}
    return GenerationRequest(**{**base, **kw})  # type: ignore[arg-type]


def run(engine: TurboEngine, req: GenerationRequest, out: Path, image: Path | None = None,
        cancel_after: int | None = None) -> tuple[object, list[Progress]]:
    events: list[Progress] = []

    def cancelled() -> bool:
        steps = [e for e in events if e.stage == "denoise" and e.step > 0]
        return cancel_after is not None and len(steps) >= cancel_after

    res = engine.render(RenderJob(job_id=1, request=req, image_path=image, output_path=out),
                        progress=events.append, cancelled=cancelled)
    return res, events


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "boat.png"
    arr = np.zeros((500, 300, 3), dtype=np.uint8)  # portrait 300x500
    arr[..., 0] = np.linspace(0, 255, 300)[None, :]
    arr[200:300, 100:200] = (250, 250, 30)
    Image.fromarray(arr).save(path)
    return path


def test_t2v_job_makes_a_labelled_playable_video(engine: TurboEngine, tmp_path: Path) -> None:
    res, events = run(engine, t2v(), tmp_path / "a.mp4")
    assert (res.width, res.height, res.frames, res.fps) == (832, 480, FRAMES, 16)
    assert res.is_demo and "untrained demo model" in res.model_label
    assert res.duration_s == pytest.approx(FRAMES / 16)
    data = Path(res.path).read_bytes()
    assert res.bytes == len(data) and res.sha256 == hashlib.sha256(data).hexdigest()
    info = media.probe(res.path)
    assert (info.codec, info.pix_fmt, info.frames, info.width, info.height) == ("h264", "yuv420p", FRAMES, 832, 480)
    assert media.is_playable_h264(res.path)
    stages = [(e.stage, e.step) for e in events]
    assert stages == [("text", 0), ("denoise", 0), ("denoise", 1), ("denoise", 2), ("denoise", 3), ("denoise", 4),
                      ("decode", 4), ("encode", 4)]
    assert all(e.step_seconds is not None and e.step_seconds > 0 for e in events if e.stage == "denoise" and e.step)
    assert {"text", "denoise", "step_1", "step_4", "decode", "encode", "total"} <= set(res.timings)
    assert engine.last_attention == "dense"  # the CPU demo resolves "auto" to SDPA


def test_same_seed_same_video_other_seed_other_video(engine: TurboEngine, tmp_path: Path) -> None:
    a, _ = run(engine, t2v(seed=7, steps=2), tmp_path / "a.mp4")
    b, _ = run(engine, t2v(seed=7, steps=2), tmp_path / "b.mp4")
    c, _ = run(engine, t2v(seed=8, steps=2), tmp_path / "c.mp4")
    assert a.sha256 == b.sha256
    assert c.sha256 != a.sha256
    assert not np.array_equal(media.decode_frames(a.path), media.decode_frames(c.path))


def test_prompt_cache_skips_the_text_encoder(engine: TurboEngine, tmp_path: Path) -> None:
    text = engine._texts["tiny"]
    run(engine, t2v(prompt="a lighthouse at dusk", steps=1), tmp_path / "a.mp4")
    misses = text.misses
    run(engine, t2v(prompt="a lighthouse at dusk", steps=1, seed=9), tmp_path / "b.mp4")
    assert text.misses == misses and text.hits >= 1


def test_cancel_between_steps(engine: TurboEngine, tmp_path: Path) -> None:
    out = tmp_path / "c.mp4"
    calls: list[int] = []
    hook = engine._bundle("tiny-t2v").experts[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(JobCancelled):
            run(engine, t2v(), out, cancel_after=2)
    finally:
        hook.remove()
    assert len(calls) == 2 and not out.exists()


def test_i2v_conditioning_and_expert_switch(engine: TurboEngine, tmp_path: Path, image_file: Path) -> None:
    b = engine._bundle("tiny-i2v")
    seen: list[tuple[int, torch.Tensor, float]] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, _a, kw, i=i: seen.append((i, kw["hidden_states"].clone(), float(kw["timestep"][0]))),
            with_kwargs=True)
        for i, m in enumerate(b.experts)
    ]
    try:
        res, _ = run(engine, i2v_req(steps=4), tmp_path / "i.mp4", image=image_file)
    finally:
        for h in hooks:
            h.remove()
    assert res.is_demo and (res.width, res.height) == (832, 480)
    # high-noise expert while t >= 0.9, then the low-noise one (sigma_max 200: t = .995 .934 .853 .609)
    assert [s[0] for s in seen] == [0, 0, 1, 1]
    assert [s[2] for s in seen] == [rcm.timestep_value(t) for t in rcm.rf_times(4, 200.0).tolist()[:-1]]
    x = seen[0][1]
    assert x.shape == (1, 36, 2, 30, 52)  # 16 noise + 4 mask + 16 image latent
    mask = x[:, 16:20]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
    vae = engine._vaes["tiny"]
    expect = vae_ops.encode_mean(vae, i2v.conditioning_video(i2v.image_tensor(i2v.open_image(image_file), 832, 480),
                                                             FRAMES))
    torch.testing.assert_close(x[:, 20:], expect)
    for _, later, _ in seen[1:]:
        torch.testing.assert_close(later[:, 16:], x[:, 16:])  # the condition is the same every step


def test_i2v_two_steps_never_uses_the_low_noise_expert(engine: TurboEngine, tmp_path: Path, image_file: Path) -> None:
    b = engine._bundle("tiny-i2v")
    used: list[int] = []
    hooks = [m.register_forward_hook(lambda *_a, i=i: used.append(i)) for i, m in enumerate(b.experts)]
    try:
        run(engine, i2v_req(steps=2, boundary=0.95), tmp_path / "i.mp4", image=image_file)
    finally:
        for h in hooks:
            h.remove()
    assert used == [0, 0]


def test_i2v_adaptive_resolution(engine: TurboEngine, tmp_path: Path, image_file: Path) -> None:
    res, _ = run(engine, i2v_req(steps=1, adaptive_resolution=True), tmp_path / "a.mp4", image=image_file)
    w, h = i2v.adaptive_size(300, 500, 832, 480)
    assert (res.width, res.height) == (w, h) == (496, 816)  # sqrt(399360 / (5/3)) = 489.5 -> 496; 815.8 -> 816
    assert media.probe(res.path).width == w


def test_decode_oom_retries_tiled_then_gives_up_cleanly(engine: TurboEngine, tmp_path: Path) -> None:
    vae = engine._vaes["tiny"]
    mode = {"fail": "untiled"}

    def fail(_m: object, _a: object) -> None:
        if mode["fail"] == "always" or not vae.use_tiling:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = vae.decoder.register_forward_pre_hook(fail)
    try:
        res, _ = run(engine, t2v(steps=1), tmp_path / "tiled.mp4")
        assert media.probe(res.path).frames == FRAMES  # made by the tiled decode
        mode["fail"] = "always"
        with pytest.raises(OutOfMemory) as err:
            run(engine, t2v(steps=1), tmp_path / "oom.mp4")
        assert "memory" in err.value.user_message and err.value.code == "out_of_memory"
    finally:
        hook.remove()
    ok, _ = run(engine, t2v(steps=1), tmp_path / "after.mp4")  # the engine keeps working
    assert media.probe(ok.path).frames == FRAMES


def test_requested_sla_attention_runs_on_the_tiny_model(engine: TurboEngine, tmp_path: Path) -> None:
    res, _ = run(engine, t2v(steps=1, attention="sla"), tmp_path / "s.mp4")
    assert engine.last_attention == "sla" and media.probe(res.path).frames == FRAMES


def test_engine_info_is_json_friendly(engine: TurboEngine) -> None:
    import json

    info = engine.info
    json.dumps(info)
    assert info["device"] == "cpu" and info["demo"] is True
    assert info["default_t2v"] == "tiny-t2v" and info["default_i2v"] == "tiny-i2v"
