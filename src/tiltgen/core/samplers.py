"""Samplers: small stateless step functions sharing one signature, and one loop.

A step maps ``x`` at time ``t`` to time ``t_next < t``::

    step(denoise, x, t, t_next, schedule, noise) -> x_next

``denoise(x, t)`` returns (x0_hat, eps_hat) from the model (see ``core.model.Denoiser``);
``noise()`` returns fresh standard normal noise shaped like x (only stochastic steps call
it). Steps know nothing of guidance: guidance wraps the model.

Deterministic: ``euler`` and ``heun`` (probability-flow ODE in canonical t, velocity
``u = alpha' x0_hat + sigma' eps_hat``), ``ddim`` (first-order exponential integrator,
``x_s = alpha_s x0_hat + sigma_s eps_hat``; identical to ``euler`` for rectified flow).
Stochastic: ``ddpm`` (ancestral sampling from the forward process posterior
q(x_s | x_t, x0_hat); valid for any schedule, flow included) and ``sde``
(Euler–Maruyama on the reverse SDE dx = [u - w^2/2 score] dt + w dW with the schedule's
natural diffusion w^2 = 2 sigma^2 (sigma'/sigma - alpha'/alpha), for flows
w^2 = 2 t / (1 - t)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import TiltgenError, check_choice
from .conversions import coefficients
from .model import Denoiser, Model
from .noise import SeededNoise, seeds_for
from .schedules import Schedule

Denoise = Callable[[Tensor, float], tuple[Tensor, Tensor]]
Noise = Callable[[], Tensor]


def _velocity(schedule: Schedule, x: Tensor, t: float, x0: Tensor, eps: Tensor) -> Tensor:
    c = coefficients(schedule, t, x)
    return c.d_alpha * x0 + c.d_sigma * eps


def euler_step(denoise: Denoise, x: Tensor, t: float, t_next: float, schedule: Schedule,
               noise: Optional[Noise] = None) -> Tensor:
    """Euler on the probability-flow ODE: x + (t_next - t) u(x, t)."""
    x0, eps = denoise(x, t)
    return x + (t_next - t) * _velocity(schedule, x, t, x0, eps)


def heun_step(denoise: Denoise, x: Tensor, t: float, t_next: float, schedule: Schedule,
              noise: Optional[Noise] = None) -> Tensor:
    """Heun (trapezoidal predictor-corrector); plain Euler on a step that ends at t = 0."""
    x0, eps = denoise(x, t)
    u = _velocity(schedule, x, t, x0, eps)
    x_euler = x + (t_next - t) * u
    if t_next <= 0:
        return x_euler
    x0_next, eps_next = denoise(x_euler, t_next)
    u_next = _velocity(schedule, x_euler, t_next, x0_next, eps_next)
    return x + (t_next - t) * 0.5 * (u + u_next)


def ddim_step(denoise: Denoise, x: Tensor, t: float, t_next: float, schedule: Schedule,
              noise: Optional[Noise] = None) -> Tensor:
    """Deterministic DDIM: re-noise the predicted x0 with the predicted eps at t_next."""
    x0, eps = denoise(x, t)
    c = coefficients(schedule, t_next, x)
    return c.alpha * x0 + c.sigma * eps


def ddpm_step(denoise: Denoise, x: Tensor, t: float, t_next: float, schedule: Schedule,
              noise: Optional[Noise] = None) -> Tensor:
    """Ancestral step: sample q(x_s | x_t, x0 = x0_hat) of the forward Markov process."""
    if noise is None:
        raise TiltgenError("the ddpm sampler is stochastic and needs a noise source")
    x0, _ = denoise(x, t)
    ct, cs = coefficients(schedule, t, x), coefficients(schedule, t_next, x)
    alpha_ts = ct.alpha / cs.alpha
    var_ts = (ct.sigma**2 - alpha_ts**2 * cs.sigma**2).clamp_min(0)
    mean = (alpha_ts * cs.sigma**2 * x + cs.alpha * var_ts * x0) / ct.sigma**2
    var = var_ts * cs.sigma**2 / ct.sigma**2
    if t_next <= 0:
        return mean
    return mean + var.sqrt() * noise()


def sde_step(denoise: Denoise, x: Tensor, t: float, t_next: float, schedule: Schedule,
             noise: Optional[Noise] = None) -> Tensor:
    """Euler–Maruyama on the reverse SDE with the natural diffusion (see module docstring).

    Where alpha(t) = 0 (flow at t = 1) the diffusion coefficient is infinite; as in
    common flow-SDE samplers it is then evaluated at t_next instead.
    """
    if noise is None:
        raise TiltgenError("the sde sampler is stochastic and needs a noise source")
    x0, eps = denoise(x, t)
    c = coefficients(schedule, t, x)
    c_w = c if bool((c.alpha > 0).all()) else coefficients(schedule, t_next, x)
    w2 = 2 * c_w.sigma**2 * (c_w.d_sigma / c_w.sigma - c_w.d_alpha / c_w.alpha)
    u = c.d_alpha * x0 + c.d_sigma * eps
    score = -eps / c.sigma
    dt = t - t_next
    x_next = x - dt * (u - 0.5 * w2 * score)
    if t_next <= 0:
        return x_next
    return x_next + (w2 * dt).sqrt() * noise()


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler_step,
    "heun": heun_step,
    "ddim": ddim_step,
    "ddpm": ddpm_step,
    "sde": sde_step,
}
STOCHASTIC = frozenset({"ddpm", "sde"})


def evals_per_sample(sampler: str, steps: int) -> int:
    """Model evaluations one sample costs with ``sampler`` over ``steps`` steps."""
    return 2 * steps - 1 if sampler == "heun" else steps


def time_grid(schedule: Schedule, steps: int, spacing: str = "uniform", t_min: float = 1e-3) -> Tensor:
    """Decreasing float64 times [steps + 1] from ``schedule.t_max`` to 0.

    ``uniform``: equal steps in t. ``logsnr``: equal steps in log-SNR between t_max and
    t_min, then a final step to 0 (better for VP schedules whose score sharpens near 0).
    """
    if steps < 1:
        raise TiltgenError(f"steps must be >= 1, got {steps}")
    check_choice("time spacing", spacing, ("uniform", "logsnr"))
    t_max = float(schedule.t_max)
    if spacing == "uniform" or steps == 1:
        return torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    lo, hi = (schedule.log_snr(torch.tensor(v, dtype=torch.float64)) for v in (t_max, t_min))
    targets = torch.linspace(float(lo), float(hi), steps, dtype=torch.float64)
    return torch.cat([_invert_log_snr(schedule, targets, t_min, t_max), torch.zeros(1, dtype=torch.float64)])


def _invert_log_snr(schedule: Schedule, targets: Tensor, t_min: float, t_max: float) -> Tensor:
    lo = torch.full_like(targets, t_min)
    hi = torch.full_like(targets, t_max)
    for _ in range(60):  # bisection: log-SNR decreases in t
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > targets
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    out = 0.5 * (lo + hi)
    out[0] = t_max
    return out


@dataclass
class StepInfo:
    """What a per-step callback sees. Returning a tensor from the callback replaces ``x``."""

    index: int
    t: float
    t_next: float
    x: Tensor
    x_next: Tensor


Callback = Callable[[StepInfo], Optional[Tensor]]


def initial_noise(schedule: Schedule, noise: Callable[[], Tensor], t_max: float | None = None) -> Tensor:
    """x at the start time: sigma(t_max) * eps (alpha(t_max) * x0 is neglected there)."""
    first = noise()
    t0 = torch.tensor(schedule.t_max if t_max is None else t_max, dtype=torch.float64)
    return float(schedule.sigma(t0)) * first


def sample(model: Model, schedule: Schedule, *, n: int | None = None, shape: Sequence[int] | None = None,
           cond: Any = None, seeds: Sequence[int] | None = None, seed: int = 0, x_init: Tensor | None = None,
           steps: int = 50, sampler: str = "heun", spacing: str = "uniform", times: Tensor | None = None,
           callback: Callback | None = None, progress: bool = True, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> Tensor:
    """Integrate from noise (t = t_max) to data (t = 0) and return x0 samples [N, *shape].

    Either give ``x_init`` (the state at ``times[0]``) or ``shape`` plus ``seeds`` (one per
    sample) or ``n`` (seeds ``seed .. seed + n - 1``). Stochastic samplers draw their step
    noise from the same per-sample generators, so each sample depends only on its seed.
    """
    step_fn = SAMPLERS[check_choice("sampler", sampler, SAMPLERS)]
    grid = time_grid(schedule, steps, spacing) if times is None else torch.as_tensor(times, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise TiltgenError("times must be a strictly decreasing 1-D sequence of at least 2 values")
    noise: Callable[[], Tensor] | None = None
    if x_init is None:
        if shape is None:
            raise TiltgenError("sample() needs either x_init or shape (the shape of one sample)")
        if seeds is None:
            seeds = seeds_for(n if n is not None else 1, seed)
        elif n is not None and n != len(seeds):
            raise TiltgenError(f"n={n} but {len(seeds)} seeds were given")
        noise = SeededNoise(seeds, shape, dtype=dtype, device=device)
        x = initial_noise(schedule, noise, float(grid[0]))
    else:
        x = x_init.to(device=device, dtype=dtype)
        if sampler in STOCHASTIC:
            seeds = seeds if seeds is not None else seeds_for(x.shape[0], seed)
            noise = SeededNoise(seeds, x.shape[1:], dtype=dtype, device=device)
    denoise = Denoiser(model, schedule, cond)
    pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    for i, (t, t_next) in enumerate(tqdm(pairs, desc=f"sampling ({sampler})", disable=not progress, leave=False)):
        x_next = step_fn(denoise, x, t, t_next, schedule, noise)
        if callback is not None:
            replaced = callback(StepInfo(i, t, t_next, x, x_next))
            if replaced is not None:
                x_next = replaced
        x = x_next
    return x
