"""The rCM sampler against docs/engine.md section 4, with fake velocity models."""

from __future__ import annotations

import math

import pytest
import torch

from generator.engine import rcm

SHAPE = (1, 2, 3, 4, 5)


def _linear_model(calls: list[tuple[float, int, torch.dtype]]):
    """v = 0.5 x + timestep / 1000 + expert (deterministic, records what it was given)."""

    def fn(x: torch.Tensor, timestep: torch.Tensor, expert: int) -> torch.Tensor:
        calls.append((float(timestep[0]), expert, x.dtype))
        assert timestep.dtype == torch.bfloat16 and timestep.shape == (x.shape[0],)
        return 0.5 * x.float() + timestep.float().view(-1, 1, 1, 1, 1) / 1000.0 + expert

    return fn


def test_t_list_sigma80_four_steps_matches_published_values() -> None:
    t = rcm.rf_times(4, 80.0)
    assert t.dtype == torch.float64
    expected = [0.98765, 0.93378, 0.85290, 0.60898, 0.0]
    assert t.tolist() == pytest.approx(expected, abs=6e-6)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_t_lists_are_prefixes_ending_in_zero(steps: int) -> None:
    full = rcm.rf_times(4, 200.0).tolist()
    t = rcm.rf_times(steps, 200.0).tolist()
    assert t[:-1] == full[:steps] and t[-1] == 0.0
    assert t[0] == pytest.approx(200.0 / 201.0, abs=1e-12)  # sin(atan s)/(cos+sin) = s/(1+s)
    assert rcm.trigflow_times(steps, 200.0)[1:-1] == [1.5, 1.4, 1.0][: steps - 1]


@pytest.mark.parametrize("bad", [0, 5])
def test_step_count_is_bounded(bad: int) -> None:
    with pytest.raises(ValueError):
        rcm.rf_times(bad, 80.0)


def test_timestep_is_t_times_1000_in_bfloat16() -> None:
    for t in rcm.rf_times(4, 80.0).tolist()[:-1]:
        v = rcm.timestep_value(t)
        assert v == float(torch.tensor(t * 1000.0).to(torch.bfloat16))
        assert abs(v - t * 1000.0) <= 4.0  # bf16 spacing near 1000
    assert rcm.timestep_value(0.98765) == 988.0


def _manual_sde(seed: int, steps: int, sigma: float) -> torch.Tensor:
    """The sampler written out by hand: init draw, then one draw per step (the last one too)."""
    gen = torch.Generator().manual_seed(seed)
    t = rcm.rf_times(steps, sigma).tolist()
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float32).double() * t[0]
    for i in range(steps):
        ts = rcm.timestep_value(t[i])
        v = (0.5 * x.float() + ts / 1000.0).double()
        x0 = x - t[i] * v
        x = (1 - t[i + 1]) * x0 + t[i + 1] * torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    return x


@pytest.mark.parametrize("steps", [1, 4])
def test_sde_matches_hand_written_draw_order(steps: int) -> None:
    calls: list[tuple[float, int, torch.dtype]] = []
    gen = torch.Generator().manual_seed(7)
    out = rcm.sample(_linear_model(calls), SHAPE, t_steps=rcm.rf_times(steps, 80.0), generator=gen,
                     dtype=torch.float32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _manual_sde(7, steps, 80.0), rtol=0, atol=0)
    # exactly steps + 1 draws were taken: the next draw is the (steps + 2)-th of a fresh generator
    fresh = torch.Generator().manual_seed(7)
    for _ in range(steps + 1):
        torch.randn(SHAPE, generator=fresh)
    torch.testing.assert_close(torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=fresh))
    assert [c[0] for c in calls] == [rcm.timestep_value(t) for t in rcm.rf_times(steps, 80.0).tolist()[:-1]]


def test_last_step_returns_x0_plus_zero_times_noise() -> None:
    # at t_next = 0 the final state is the x0 estimate exactly (the draw is multiplied by 0)
    seen: list[torch.Tensor] = []

    def fn(x: torch.Tensor, ts: torch.Tensor, e: int) -> torch.Tensor:
        seen.append(x.double())
        return torch.ones_like(x)

    out = rcm.sample(fn, SHAPE, t_steps=rcm.rf_times(1, 80.0), generator=torch.Generator().manual_seed(1),
                     dtype=torch.float32)
    t0 = rcm.rf_times(1, 80.0)[0].item()
    torch.testing.assert_close(out, seen[0] - t0)


def test_ode_draws_only_the_initial_noise() -> None:
    gen = torch.Generator().manual_seed(3)
    t = rcm.rf_times(3, 200.0).tolist()
    out = rcm.sample(lambda x, ts, e: torch.full_like(x, 2.0), SHAPE, t_steps=rcm.rf_times(3, 200.0),
                     generator=gen, dtype=torch.float32, sde=False)
    ref = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=ref).double() * t[0]
    for i in range(3):
        x = x - (t[i] - t[i + 1]) * 2.0
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=ref))


def test_same_seed_same_result_other_seed_other_result() -> None:
    def run(seed: int) -> torch.Tensor:
        return rcm.sample(_linear_model([]), SHAPE, t_steps=rcm.rf_times(4, 80.0),
                          generator=torch.Generator().manual_seed(seed), dtype=torch.float32)

    torch.testing.assert_close(run(11), run(11), rtol=0, atol=0)
    assert not torch.equal(run(11), run(12))


def test_model_sees_its_dtype_and_state_stays_float64() -> None:
    calls: list[tuple[float, int, torch.dtype]] = []
    out = rcm.sample(_linear_model(calls), SHAPE, t_steps=rcm.rf_times(2, 80.0),
                     generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert {c[2] for c in calls} == {torch.bfloat16}
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    ("steps", "boundary", "experts", "expected"),
    [
        (4, 0.9, 2, [0, 0, 1, 1]),  # t = .995 .934 .853 .609 (sigma 200)
        (3, 0.9, 2, [0, 0, 1]),
        (2, 0.9, 2, [0, 0]),
        (1, 0.9, 2, [0]),
        (2, 0.95, 2, [0, 0]),  # never the low-noise expert at 1-2 steps
        (4, 0.5, 2, [0, 0, 0, 0]),
        (4, 0.9, 1, [0, 0, 0, 0]),
        (4, 1.0, 2, [1, 1, 1, 1]),
    ],
)
def test_expert_schedule(steps: int, boundary: float, experts: int, expected: list[int]) -> None:
    assert rcm.expert_schedule(rcm.rf_times(steps, 200.0), boundary, experts) == expected


def test_switch_is_for_good_even_if_t_rose_again() -> None:
    assert rcm.expert_schedule([0.95, 0.85, 0.92, 0.5, 0.0], 0.9, 2) == [0, 1, 1, 1]


def test_sampler_calls_the_planned_expert_each_step() -> None:
    calls: list[tuple[float, int, torch.dtype]] = []
    t = rcm.rf_times(4, 200.0)
    plan = rcm.expert_schedule(t, 0.9, 2)
    rcm.sample(_linear_model(calls), SHAPE, t_steps=t, generator=torch.Generator().manual_seed(0),
               dtype=torch.float32, experts=plan)
    assert [c[1] for c in calls] == [0, 0, 1, 1]


def test_before_step_can_cancel_and_after_step_reports() -> None:
    calls: list[tuple[float, int, torch.dtype]] = []
    events: list[rcm.StepEvent] = []

    class Stop(Exception):
        pass

    def before(i: int) -> None:
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        rcm.sample(_linear_model(calls), SHAPE, t_steps=rcm.rf_times(4, 80.0),
                   generator=torch.Generator().manual_seed(0), dtype=torch.float32,
                   before_step=before, after_step=events.append)
    assert len(calls) == 2
    assert [e.index for e in events] == [0, 1] and all(e.total == 4 for e in events)
    assert events[0].t_cur == pytest.approx(0.98765, abs=6e-6) and math.isfinite(events[0].seconds)
