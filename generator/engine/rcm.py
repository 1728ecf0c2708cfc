"""The rCM few-step sampler (docs/engine.md section 4), as pure functions over a velocity model.

No classifier-free guidance: one model call per step. The model is passed in as a callable
``model_fn(x, timestep, expert) -> velocity`` so the sampler can be tested with a fake model and the
engine can wrap the real one (I2V conditioning, expert choice, OOM retry) around it.

Numerics follow the released sampler: TrigFlow times -> rectified-flow times in float64, the state in
float64, the model fed ``x`` in its own dtype and ``timestep = t * 1000`` rounded to bfloat16, and one
seeded generator drawing first the initial noise, then (SDE) one fresh noise per step, the last included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAX_STEPS = 4
# TrigFlow times after the first (which is atan(sigma_max)); a run of n steps uses the first n-1 of them.
TRIG_MID_TIMES = (1.5, 1.4, 1.0)
HIGH_NOISE, LOW_NOISE = 0, 1

ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def trigflow_times(steps: int, sigma_max: float) -> list[float]:
    """TrigFlow times [atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0]."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"rCM supports 1 to {MAX_STEPS} steps, got {steps}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    return [math.atan(sigma_max), *TRIG_MID_TIMES[: steps - 1], 0.0]


def rf_times(steps: int, sigma_max: float) -> torch.Tensor:
    """Rectified-flow times t = sin(T) / (cos(T) + sin(T)), float64 on the CPU; steps + 1 values ending in 0."""
    trig = torch.tensor(trigflow_times(steps, sigma_max), dtype=torch.float64)
    return torch.sin(trig) / (torch.cos(trig) + torch.sin(trig))


def timestep_value(t_cur: float) -> float:
    """The number the model sees: t rounded to float32, times 1000 (float64), rounded to bfloat16."""
    scaled = float(np.float32(t_cur)) * 1000.0
    return float(torch.tensor(scaled, dtype=torch.float64).to(torch.bfloat16).item())


def timestep_tensor(t_cur: float, batch: int, device: torch.device) -> torch.Tensor:
    """``timestep_value`` as a bfloat16 [batch] tensor on ``device``."""
    return torch.full((batch,), timestep_value(t_cur), dtype=torch.bfloat16, device=device)


def expert_schedule(t_steps: Sequence[float] | torch.Tensor, boundary: float, num_experts: int) -> list[int]:
    """Which expert runs each step: high-noise until the first step whose t_cur < boundary, then low-noise for
    good. With one expert, or with 1-2 steps (whose t_cur all lie near 1), only the high-noise expert runs."""
    times = [float(t) for t in t_steps]
    steps = len(times) - 1
    if num_experts < 2 or steps <= 2:
        return [HIGH_NOISE] * steps
    out: list[int] = []
    switched = False
    for t_cur in times[:-1]:
        if not switched and t_cur < boundary:
            switched = True
        out.append(LOW_NOISE if switched else HIGH_NOISE)
    return out


@dataclass(frozen=True)
class StepEvent:
    index: int  # 0-based step just finished
    total: int
    t_cur: float
    t_next: float
    expert: int
    seconds: float
    x0: torch.Tensor | None = None  # the step's denoised estimate (float64, the state's device): for previews


def initial_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """The first draw of the job's generator: float32 standard normal of ``shape`` on the generator's device."""
    return torch.randn(*shape, dtype=torch.float32, device=generator.device, generator=generator)


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    t_steps: torch.Tensor,
    generator: torch.Generator,
    dtype: torch.dtype,
    sde: bool = True,
    experts: Sequence[int] | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[StepEvent], None] | None = None,
) -> torch.Tensor:
    """Run rCM from pure noise; returns the final x0 estimate in float64 on the generator's device.

    ``t_steps``: the rf times (``rf_times``). ``experts``: one expert index per step (default all 0).
    ``before_step(i)`` runs before step i (raise there to cancel); ``after_step`` gets a ``StepEvent``.
    """
    times = [float(t) for t in t_steps]
    steps = len(times) - 1
    if steps < 1:
        raise ValueError("t_steps needs at least two values")
    plan = list(experts) if experts is not None else [HIGH_NOISE] * steps
    if len(plan) != steps:
        raise ValueError(f"{len(plan)} experts given for {steps} steps")
    device = generator.device
    batch = int(shape[0])
    x = initial_noise(shape, generator).to(torch.float64) * times[0]
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        t_cur, t_next = times[i], times[i + 1]
        start = time.perf_counter()
        v = model_fn(x.to(dtype), timestep_tensor(t_cur, batch, device), plan[i]).to(torch.float64)
        if v.shape != x.shape:
            raise RuntimeError(f"model returned {tuple(v.shape)}, expected {tuple(x.shape)}")
        x0 = x - t_cur * v  # rectified flow: x_t = (1 - t) x0 + t noise and v = noise - x0
        if sde:
            noise = torch.randn(*x.shape, dtype=torch.float32, device=device, generator=generator)
            x = (1.0 - t_next) * x0 + t_next * noise
        else:
            x = x - (t_cur - t_next) * v
        if after_step is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # honest per-step seconds
            after_step(StepEvent(i, steps, t_cur, t_next, plan[i], time.perf_counter() - start, x0=x0))
        del x0
    return x
