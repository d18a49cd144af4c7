"""Particle methods: best-of-N and SMC / Feynman-Kac steering towards p*(x0) ∝ p(x0) exp(r(x0)/beta).

Both run ``n`` independent populations of ``particles`` (N) samples, batched as n·N, and
return one sample per population; every output sample therefore costs N trajectories.

**SMC.** Twisted targets p_t(x_t) h_t(x_t) with the plug-in twist
log h_t ≈ r(x0_hat(x_t)) / beta (x0_hat of the base model, one model call per step that
the sampler makes anyway; reward values only, so non-differentiable rewards work). At
t = 0 the twist is exact, r(x0) / beta. A particle's log weight accumulates
log h_{t_next} - log h_t over the steps; when a population's ESS / N falls below
``ess_threshold`` it is resampled (systematic) and its weights reset. The output is one
particle per population drawn with probability ∝ its final weight, so the method is
consistent as N grows whatever the twist (the twist only changes the variance).

**With a drift** (any :class:`GuidanceEstimator`), particles move under the guided
transition q instead of the base p, and the weight gains log p(x_next | x) - log q(x_next | x).
For the stochastic samplers (``ddpm``, ``sde``) both are Gaussians with the same per-sample
isotropic scale S and means m_p, m_q, so the ratio is exact and cheap:
[|x_next - m_q|^2 - |x_next - m_p|^2] / (2 S^2). The last step (to t = 0) is deterministic,
so it uses the base mean (no drift, no correction). With a deterministic sampler the ratio
would need the divergence of the guided flow; that combination is refused.
Without a drift a deterministic sampler is allowed (the base ODE preserves p_t, so the same
weights apply) but resampled copies stay identical: use a stochastic sampler for diversity.

**Twisted SMC** (``twist``): any estimate of log h_t(x_t) replaces the plug-in twist, e.g. a
learned guidance network's log potential (:meth:`LearnedGuidance.log_twist`), with its drift as the
proposal. The closer the twist is to the true log h_t, the more even the weights (with the exact
twist and drift every weight is equal); the final weight is exact, so the method stays
consistent as N grows whatever the twist. Every run also returns the log normalising-constant
estimate log Z ≈ log E_p[exp(r(x0)/beta)] per population: the sum, over the resampling epochs,
of the log mean weight (unbiased in Z).

**Hand-off** (``handoff=True``). A learned log h_t is accurate at high noise, where the plug-in
is far off, but its error grows towards the data, where the plug-in becomes exact (at t = 0 it
*is* log h_0 = r/beta). Every step then evaluates both, and the step's log-weight increments
log h_{t_next} - log h_t + (proposal correction) under each. The exact twist, with the exact
drift, makes them equal across particles, so their spread within a population measures a
twist's error where the particles are. From the first step at which the plug-in's spread is
the smaller, the plug-in is the twist to the end. Any sequence of twists leaves SMC consistent
(the final weight is exact), and between resamplings the twists telescope out of the weights,
so the choice only decides where resampling moves the particles.

**Best-of-N** keeps the highest-reward particle of each population: a baseline that is
*not* consistent for p* (it converges to the reward maximiser as N grows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.conversions import coefficients, to_x0_eps
from ..core.model import Model, as_model
from ..core.reward import Reward, as_reward, evaluate_reward
from ..core.samplers import SAMPLERS, STOCHASTIC, initial_noise, sample, time_grid
from ..core.schedules import Schedule
from ..errors import TiltgenError, check_beta, check_choice
from .base import GuidanceEstimator
from .decomposition import Tilt, apply_tilt, x0_shift_from_g


@dataclass
class ParticleResult:
    """samples [n, ...]; particles [n, N, ...] and their normalised log weights [n, N];
    ``resamples``: number of (population, step) resampling events; ``ess`` [steps]: mean ESS / N
    before resampling at each step (empty for best-of-N); ``log_z``: SMC's log normalising
    constant estimate per population."""

    samples: Tensor
    particles: Tensor
    log_weights: Tensor
    resamples: int = 0
    ess: list[float] | None = None
    log_z: Tensor | None = None  # [n] estimate of log E_p[exp(r / beta)] per population (SMC)
    rewards: Tensor | None = None  # [n, N] float64 final rewards of the particles (SMC)
    handoff_t: float | None = None  # twisted SMC with hand-off: the time the plug-in twist took over


def check_particles(particles: int) -> int:
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise TiltgenError(f"the number of particles N must be an integer >= 1, got {particles!r}")
    return particles


def check_ess_threshold(threshold: float) -> float:
    value = float(threshold)
    if not 0 < value <= 1:
        raise TiltgenError(f"ess_threshold must be in (0, 1] (resample when ESS / N falls below it), got {threshold!r}")
    return value


def ess_fraction(log_w: Tensor) -> Tensor:
    """ESS / N per population from log weights [n, N] -> [n]."""
    w = torch.softmax(log_w, 1)
    return 1.0 / (w**2).sum(1) / log_w.shape[1]


def systematic_resample(log_w: Tensor, generator: torch.Generator) -> Tensor:
    """Ancestor indices [n, N] (within each population) by systematic resampling."""
    n, big_n = log_w.shape
    cdf = torch.cumsum(torch.softmax(log_w, 1), 1)
    cdf[:, -1] = 1.0  # guard against round-off above the last point
    u = (torch.rand(n, 1, generator=generator, dtype=torch.float64) + torch.arange(big_n, dtype=torch.float64)) / big_n
    return torch.searchsorted(cdf.to(torch.float64).contiguous(), u.contiguous()).clamp(max=big_n - 1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x [n*N, ...] picked per population by idx [n, N] (indices within a population)."""
    n, big_n = idx.shape
    flat = (idx + torch.arange(n, device=idx.device)[:, None] * big_n).flatten()
    return x[flat]


def _select(x: Tensor, idx: Tensor, big_n: int) -> Tensor:
    """One row per population: x [n*N, ...], idx [n] -> [n, ...]."""
    return x[idx + torch.arange(idx.shape[0], device=idx.device) * big_n]


def _repeat_cond(cond: Any, big_n: int) -> Any:
    """Per-population conditioning [n, ...] -> per-particle [n*N, ...] (tensors and lists)."""
    if isinstance(cond, Tensor):
        return cond.repeat_interleave(big_n, 0)
    if isinstance(cond, (list, tuple)):
        return type(cond)([c for c in cond for _ in range(big_n)])
    return cond


class _StepModel:
    """Evaluates the base model once at the step's state and serves the step's first denoise
    call from that cache (optionally tilted by a drift); further calls (Heun's corrector; a
    drift is only allowed with single-call stochastic steps) go to the base model."""

    def __init__(self, model: Model, schedule: Schedule, cond: Any, drift: GuidanceEstimator | None):
        self.model = model
        self.schedule = schedule
        self.cond = cond
        self.drift = drift

    def evaluate(self, x: Tensor, t: float, use_drift: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Base (x0_hat, eps_hat) at (x, t) and the drift's x0 shift (None without drift or if not
        ``use_drift``)."""
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        c = coefficients(self.schedule, t_vec, x)
        drift = self.drift if use_drift else None
        needs_grad = drift is not None and drift.needs_model_grad
        with torch.enable_grad() if needs_grad else torch.no_grad():
            xg = x.detach().requires_grad_(needs_grad)
            x0, eps = to_x0_eps(self.model.prediction, self.model(xg, t_vec, self.cond), xg, c)
            shift = None
            if drift is not None:
                tilt = drift(xg, t_vec, self.cond, x0)
                shift = tilt.x0_shift if tilt.x0_shift is not None else x0_shift_from_g(tilt.g, c)
                shift = shift.detach()
        return x0.detach(), eps.detach(), shift

    def denoiser(self, first: tuple[Tensor, Tensor]) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
        calls = {"n": 0}

        def denoise(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
            calls["n"] += 1
            if calls["n"] == 1:
                return first
            t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            with torch.no_grad():
                pred = self.model(x, t_vec, self.cond)
            return to_x0_eps(self.model.prediction, pred, x, coefficients(self.schedule, t_vec, x))

        return denoise


def _transition_log_ratio(x_next: Tensor, mean_q: Tensor, mean_p: Tensor, z: Tensor) -> Tensor:
    """log p(x_next | x) - log q(x_next | x) for isotropic Gaussians N(m, S^2 I) sharing S  [n*N]."""
    dq = (x_next - mean_q).flatten(1)
    dp = (x_next - mean_p).flatten(1)
    s2 = (dq**2).sum(1) / (z.flatten(1) ** 2).sum(1).clamp_min(1e-30)  # x_next - m_q = S z
    return ((dq**2).sum(1) - (dp**2).sum(1)) / (2 * s2.clamp_min(1e-30))


def smc_sample(model: Model, schedule: Schedule, reward: Reward, beta: float, *, n: int, particles: int,
               shape: Sequence[int], cond: Any = None, drift: GuidanceEstimator | None = None,
               twist: Callable[[Tensor, Tensor, Any], Tensor] | None = None, handoff: bool = False,
               sampler: str = "ddpm", steps: int = 50, spacing: str = "uniform", ess_threshold: float = 0.5,
               seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ParticleResult:
    """SMC / Feynman-Kac steering (module docstring): n populations of N particles -> ParticleResult.

    ``cond`` is per population ([n, ...] tensor or list of n prompts, or None). ``twist``:
    ``(x_t, t [n*N], cond) -> log h_t estimate [n*N]`` (twisted SMC); default the plug-in
    r(x0_hat)/beta. ``handoff`` (with a ``twist``): from the first step at which the plug-in's
    one-step log-weight increments vary less within the populations than the twist's, the
    plug-in takes over (module docstring; costs one reward evaluation per particle and step).
    Reproducible given (seed, n, N): one generator drives the whole batch.
    """
    model = as_model(model)
    reward = as_reward(reward)
    beta = check_beta(beta)
    big_n = check_particles(particles)
    threshold = check_ess_threshold(ess_threshold)
    step_fn = SAMPLERS[check_choice("sampler", sampler, SAMPLERS)]
    if drift is not None and sampler not in STOCHASTIC:
        raise TiltgenError(f"SMC with a drift needs a stochastic sampler ({', '.join(sorted(STOCHASTIC))}) so that the "
                           f"proposal density ratio is known; got {sampler!r}")
    if n < 1:
        raise TiltgenError(f"the number of populations n must be >= 1, got {n}")
    if handoff and twist is None:
        raise TiltgenError("handoff=True hands a twist over to the plug-in r(x0_hat)/beta: give the twist to hand over")
    grid = time_grid(schedule, steps, spacing)
    gen = torch.Generator().manual_seed(int(seed))
    size = (n * big_n,) + tuple(int(d) for d in shape)

    def noise() -> Tensor:
        return torch.randn(size, generator=gen).to(device=device, dtype=dtype)

    cond_p = _repeat_cond(cond, big_n)
    stepper = _StepModel(model, schedule, cond_p, drift)
    x = initial_noise(schedule, noise, float(grid[0]))
    log_w = torch.zeros(n, big_n, dtype=torch.float64)
    log_h_prev = torch.zeros(n * big_n, dtype=torch.float64)
    correction = torch.zeros(n * big_n, dtype=torch.float64)
    resamples, ess_trace = 0, []
    log_z = torch.zeros(n, dtype=torch.float64)
    pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    handed, handoff_t = twist is None, None  # no twist: the plug-in from the start
    plug, plug_prev = None, None
    for step, (t, t_next) in enumerate(pairs):
        x0, eps, shift = stepper.evaluate(x, t, use_drift=t_next > 0)  # last step: no drift
        if handed or handoff:
            plug = evaluate_reward(reward, x0, cond_p).detach().to(torch.float64) / beta
        if handed:
            log_h = plug
        else:
            log_h = _twist_values(twist, x, t, cond_p)
            if handoff and step > 0 and _plug_in_steadier(plug - plug_prev, log_h - log_h_prev, correction, n, big_n):
                log_h, handed, handoff_t = plug, True, float(t)
        log_w = log_w + (log_h - log_h_prev + correction).reshape(n, big_n)
        ess = ess_fraction(log_w)
        ess_trace.append(float(ess.mean()))
        low = ess < threshold
        if bool(low.any()):
            log_z[low] += _log_mean_exp(log_w[low])
            idx = torch.arange(big_n).expand(n, big_n).clone()
            idx[low] = systematic_resample(log_w[low], gen)
            x, x0, eps, log_h = (_gather(v, idx) for v in (x, x0, eps, log_h))
            shift = None if shift is None else _gather(shift, idx)
            plug = None if plug is None else _gather(plug, idx)
            log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)
            resamples += int(low.sum())
        x, correction = _move(step_fn, stepper, schedule, x, t, t_next, x0, eps, shift, noise)
        log_h_prev, plug_prev = log_h, plug
    final = evaluate_reward(reward, x, cond_p).detach().to(torch.float64) / beta
    log_w = log_w + (final - log_h_prev + correction).reshape(n, big_n)
    log_z += _log_mean_exp(log_w)
    pick = torch.multinomial(torch.softmax(log_w, 1), 1, generator=gen)[:, 0]
    return ParticleResult(_select(x, pick, big_n), x.reshape((n, big_n) + x.shape[1:]),
                          torch.log_softmax(log_w, 1), resamples, ess_trace, log_z, (final * beta).reshape(n, big_n),
                          handoff_t)


def _plug_in_steadier(plug_step: Tensor, twist_step: Tensor, correction: Tensor, n: int, big_n: int) -> bool:
    """Whether the plug-in's one-step log-weight increments [n*N] vary less within the populations
    (variance over the N particles, averaged over the n populations) than the twist's."""
    def spread(step: Tensor) -> float:
        return float((step + correction).reshape(n, big_n).var(1, unbiased=False).mean())

    return spread(plug_step) < spread(twist_step)


def _log_mean_exp(log_w: Tensor) -> Tensor:
    """log of the mean of exp(log_w) over the last dimension [rows]."""
    return torch.logsumexp(log_w, -1) - torch.log(torch.tensor(float(log_w.shape[-1]), dtype=log_w.dtype))


def _twist_values(twist: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, t: float, cond: Any) -> Tensor:
    """The twist's log h_t [n*N] (float64), checked for shape and finiteness."""
    t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        values = twist(x, t_vec, cond)
    values = torch.as_tensor(values).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if values.shape[0] != x.shape[0]:
        raise TiltgenError(f"the SMC twist returned {values.shape[0]} values for {x.shape[0]} particles")
    if not bool(torch.isfinite(values).all()):
        raise TiltgenError(f"the SMC twist returned non-finite values at t = {t:.4g}")
    return values


def _move(step_fn: Callable[..., Tensor], stepper: _StepModel, schedule: Schedule, x: Tensor, t: float,
          t_next: float, x0: Tensor, eps: Tensor, shift: Tensor | None,
          noise: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """One sampler step from cached model outputs -> (x_next, log p/q of the transition [n*N])."""
    zero = torch.zeros(x.shape[0], dtype=torch.float64)
    if shift is None or t_next <= 0:  # the final step is deterministic: base mean, no drift
        return step_fn(stepper.denoiser((x0, eps)), x, t, t_next, schedule, noise), zero
    c = coefficients(schedule, t, x)
    guided = apply_tilt(x0, eps, Tilt(x0_shift=shift), c)
    z = noise()
    x_next = step_fn(stepper.denoiser(guided), x, t, t_next, schedule, lambda: z)
    mean_q = step_fn(stepper.denoiser(guided), x, t, t_next, schedule, lambda: torch.zeros_like(z))
    mean_p = step_fn(stepper.denoiser((x0, eps)), x, t, t_next, schedule, lambda: torch.zeros_like(z))
    return x_next, _transition_log_ratio(x_next, mean_q, mean_p, z).to(torch.float64)


def best_of_n(model: Model, schedule: Schedule, reward: Reward, *, n: int, particles: int, shape: Sequence[int],
              cond: Any = None, sampler: str = "heun", steps: int = 50, spacing: str = "uniform", seed: int = 0,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ParticleResult:
    """Best-of-N: n populations of N samples of ``model`` (plain or guided); keep the best by reward.

    Particle j of population i uses seed ``seed + i * N + j``, so each sample depends on its seed only.
    """
    model = as_model(model)
    reward = as_reward(reward)
    big_n = check_particles(particles)
    if n < 1:
        raise TiltgenError(f"the number of populations n must be >= 1, got {n}")
    cond_p = _repeat_cond(cond, big_n)
    x = sample(model, schedule, shape=shape, cond=cond_p, seeds=range(seed, seed + n * big_n), steps=steps,
               sampler=sampler, spacing=spacing, progress=False, dtype=dtype, device=device)
    r = evaluate_reward(reward, x, cond_p).detach().reshape(n, big_n)
    best = r.argmax(1)
    log_w = torch.full((n, big_n), -float("inf"), dtype=torch.float64)
    log_w[torch.arange(n), best] = 0.0
    return ParticleResult(_select(x, best, big_n), x.reshape((n, big_n) + x.shape[1:]), log_w)
