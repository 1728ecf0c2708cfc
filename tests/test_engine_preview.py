"""Live previews from the engine: the x0 estimate of each rCM step but the last, as a few small uint8 frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from generator.engine import create_engine, rcm
from generator.engine import preview as preview_ops
from generator.engine.api import Progress, RenderJob
from generator.engine.options import EngineOptions
from generator.engine.runtime import TurboEngine
from generator.request import GenerationRequest


@pytest.fixture(scope="module")
def engine() -> TurboEngine:
    eng = create_engine(EngineOptions(device="cpu"))
    assert isinstance(eng, TurboEngine)
    eng.load()
    return eng


def render(engine: TurboEngine, out: Path, interval: float | None, *, steps: int = 4, frames: int = 17,
           model: str = "tiny-t2v") -> list[Progress]:
    req = GenerationRequest(mode="t2v", prompt="a lighthouse at dusk", model=model, frames=frames, seed=3,
                            steps=steps)
    events: list[Progress] = []
    engine.render(RenderJob(job_id=1, request=req, output_path=out, preview_interval_s=interval),
                  progress=events.append, cancelled=lambda: False)
    return events


def test_previews_after_every_step_but_the_last(engine: TurboEngine, tmp_path: Path) -> None:
    events = render(engine, tmp_path / "a.mp4", 0.0, steps=4, frames=17)
    with_preview = [e for e in events if e.preview is not None]
    assert [e.step for e in with_preview] == [1, 2, 3]  # never the last step: the video follows
    assert all(e.stage == "denoise" for e in with_preview)
    for e in with_preview:
        f = e.preview
        assert isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 4 and f.shape[-1] == 3
        # 17 frames = 5 latent frames: all of them (fewer than PREVIEW_FRAMES)
        assert f.shape[0] == 5
        assert max(f.shape[1:3]) <= preview_ops.PREVIEW_SIDE


def test_previews_off_by_default_and_throttled(engine: TurboEngine, tmp_path: Path) -> None:
    assert all(e.preview is None for e in render(engine, tmp_path / "b.mp4", None))
    # An interval far longer than the job: only the first eligible step gets one.
    events = render(engine, tmp_path / "c.mp4", 3600.0)
    assert [e.step for e in events if e.preview is not None] == [1]
    # One step: its only step is the last, so no preview at all.
    assert all(e.preview is None for e in render(engine, tmp_path / "d.mp4", 0.0, steps=1))


def test_linear_projection_shapes_and_range() -> None:
    assert tuple(preview_ops.LINEAR_RGB.shape) == (16, 3) and tuple(preview_ops.LINEAR_BIAS.shape) == (3,)
    # Each colour's weights have the same norm, so unit-variance channels give the same spread in each colour.
    norms = preview_ops.LINEAR_RGB.norm(dim=0)
    assert torch.allclose(norms, norms[0].expand(3), atol=1e-6)
    lat = torch.zeros(1, 16, 21, 60, 104)  # 480p 16:9, 81 frames
    out = preview_ops.linear_preview(lat, spatial_factor=8)
    assert out.dtype == np.uint8 and out.shape == (6, 148, 256, 3)
    assert np.abs(out.astype(int) - 128).max() <= 1  # the mean latent is mid-grey
    noisy = preview_ops.linear_preview(torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert noisy.shape == (3, 64, 64, 3) and noisy.std() > 10  # structure shows
    with pytest.raises(ValueError):
        preview_ops.linear_preview(torch.zeros(1, 48, 2, 4, 4))


def test_linear_preview_when_the_model_has_no_tiny_decoder(engine: TurboEngine, tmp_path: Path) -> None:
    b = engine._bundle("tiny-t2v")
    key = b.tiny_key
    b.tiny_key = None
    try:
        events = render(engine, tmp_path / "e.mp4", 0.0, steps=2)
    finally:
        b.tiny_key = key
    (only,) = [e for e in events if e.preview is not None]
    assert only.step == 1 and only.preview.shape[0] == 5 and only.preview.dtype == np.uint8


def test_tiny_preview_pools_large_latents(engine: TurboEngine) -> None:
    model = engine._tinies["tiny"]
    out = preview_ops.tiny_preview(model, torch.randn(1, 16, 21, 30, 52))  # 16x: 480x832 at full size
    assert out.shape[0] == 6 and max(out.shape[1:3]) == 256 and out.dtype == np.uint8


def test_frame_indices_are_evenly_spread() -> None:
    assert preview_ops.frame_indices(21, 6) == [0, 4, 8, 12, 16, 20]
    assert preview_ops.frame_indices(3, 6) == [0, 1, 2]


def test_sampler_hands_out_the_x0_estimate() -> None:
    seen: list[torch.Tensor] = []
    shape = (1, 2, 1, 2, 2)

    def model_fn(x: torch.Tensor, _t: torch.Tensor, _e: int) -> torch.Tensor:
        return torch.ones_like(x)

    for sde in (True, False):
        seen.clear()
        rcm.sample(model_fn, shape, t_steps=rcm.rf_times(2, 80.0), generator=torch.Generator().manual_seed(0),
                   dtype=torch.float32, sde=sde, after_step=lambda ev: seen.append(ev.x0))
        assert len(seen) == 2 and all(x is not None and tuple(x.shape) == shape for x in seen)
