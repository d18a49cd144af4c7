"""Noise schedules in the canonical convention.

t in [0, 1], t = 0 is data, t = 1 is noise, and ``x_t = alpha(t) * x0 + sigma(t) * eps``.
Every schedule gives alpha, sigma and their time derivatives; everything else
(conversions, samplers, guidance coefficients) is derived from these four functions.
All methods take a tensor ``t`` of any shape and return a tensor of the same shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import TiltgenError


class Schedule:
    """Base class: subclasses implement ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma``.

    ``family`` is ``"vp"`` (alpha^2 + sigma^2 = 1) or ``"flow"`` (alpha + sigma = 1 before
    any time shift). ``t_max`` is where samplers start: 1 unless alpha would vanish in a
    way that makes eps-parameterised models undefined there.
    """

    family: str = ""
    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2), decreasing in t."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def config(self) -> dict:
        """JSON-serialisable description (``name`` plus constructor arguments)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class VPLinear(Schedule):
    """Continuous VP with linear beta(t) = beta_min + (beta_max - beta_min) t (Song et al.).

    log abar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2), alpha = sqrt(abar).
    """

    family = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise TiltgenError(f"VPLinear needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + (self.beta_max - self.beta_min) * t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def config(self) -> dict:
        return {"name": "vp-linear", "beta_min": self.beta_min, "beta_max": self.beta_max}


class VPCosine(Schedule):
    """Cosine VP schedule (Nichol & Dhariwal): alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    alpha(1) = 0, so samplers start at ``t_max`` < 1 where alpha is still positive.
    """

    family = "vp"

    def __init__(self, s: float = 0.008, t_max: float = 0.9946):
        self.s = float(s)
        self.t_max = float(t_max)
        self._norm = math.cos(self.s / (1 + self.s) * math.pi / 2)

    def _angle(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(self._angle(t)) / self._norm

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - self.alpha(t) ** 2).clamp_min(0))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.sin(self._angle(t)) * (math.pi / 2) / (1 + self.s) / self._norm

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def config(self) -> dict:
        return {"name": "vp-cosine", "s": self.s, "t_max": self.t_max}


def ddpm_betas(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> Tensor:
    """The discrete beta tables diffusers calls ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2``
    (the cosine schedule, betas capped at 0.999; beta_start and beta_end unused), float64."""
    n = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        grid = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise TiltgenError(f"unknown beta schedule {kind!r}; choose 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")


class DiscreteVP(Schedule):
    """A discrete DDPM beta table (e.g. Stable Diffusion's ``scaled_linear``) in continuous time.

    Integer timestep k in 0..N-1 (diffusers' convention, k = 0 least noisy) sits at
    t_k = (k + 1) / N; t = 0 is clean data (abar = 1). Between grid points log(alpha) is
    linear in t, so alpha(t_k) equals sqrt(alphas_cumprod[k]) exactly and derivatives exist
    everywhere except at the knots (where the right-hand derivative is used).
    """

    family = "vp"

    def __init__(self, betas: Tensor | Sequence[float]):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise TiltgenError("DiscreteVP needs a 1-D table of at least 2 betas in (0, 1)")
        self.betas = betas
        self.num_train_timesteps = len(betas)
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        self._log_alpha_knots = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * log_abar])

    @classmethod
    def from_diffusers(cls, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                       beta_start: float = 0.00085, beta_end: float = 0.012) -> "DiscreteVP":
        """Build from the fields of a diffusers scheduler config."""
        return cls(ddpm_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))

    def timestep_to_t(self, timestep: Tensor) -> Tensor:
        """diffusers integer (or fractional) timestep -> canonical t."""
        return (torch.as_tensor(timestep, dtype=torch.float64) + 1) / self.num_train_timesteps

    def t_to_timestep(self, t: Tensor) -> Tensor:
        """Canonical t -> fractional diffusers timestep (inverse of ``timestep_to_t``)."""
        return t * self.num_train_timesteps - 1

    def _locate(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        knots = self._log_alpha_knots.to(t.device)
        pos = (t.to(torch.float64) * self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        idx = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        frac = pos - idx
        slope = (knots[idx + 1] - knots[idx]) * self.num_train_timesteps
        return knots[idx] + frac * (knots[idx + 1] - knots[idx]), slope, idx

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._locate(t)[0]).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._locate(t)[0])).to(t.dtype)

    def d_alpha(self, t: Tensor) -> Tensor:
        log_alpha, slope, _ = self._locate(t)
        return (torch.exp(log_alpha) * slope).to(t.dtype)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def config(self) -> dict:
        return {"name": "vp-discrete", "betas": self.betas.tolist()}


class RectifiedFlow(Schedule):
    """Rectified flow: alpha = 1 - s(t), sigma = s(t), s(t) = shift t / (1 + (shift - 1) t).

    ``shift = 1`` is the plain linear path; ``shift > 1`` is SD3's resolution shift, which
    spends more of a uniform t grid at high noise. Native flow time (diffusers' sigma) is
    ``sigma(t)``; a model's native velocity dx/dsigma equals canonical velocity / s'(t).
    """

    family = "flow"

    def __init__(self, shift: float = 1.0):
        if not (math.isfinite(shift) and shift > 0):
            raise TiltgenError(f"RectifiedFlow shift must be > 0, got {shift!r}")
        self.shift = float(shift)

    def sigma(self, t: Tensor) -> Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.sigma(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.shift / (1 + (self.shift - 1) * t) ** 2

    def d_alpha(self, t: Tensor) -> Tensor:
        return -self.d_sigma(t)

    def native_to_t(self, native_sigma: Tensor) -> Tensor:
        """diffusers flow sigma -> canonical t (inverse of the shift)."""
        return native_sigma / (self.shift - (self.shift - 1) * native_sigma)

    def config(self) -> dict:
        return {"name": "flow", "shift": self.shift}


SCHEDULES = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "flow": RectifiedFlow}


def schedule_from_config(config: dict) -> Schedule:
    """Inverse of ``Schedule.config()``."""
    config = dict(config)
    name = config.pop("name", None)
    if name == "vp-discrete":
        return DiscreteVP(config["betas"])
    if name not in SCHEDULES:
        raise TiltgenError(f"unknown schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES) + ['vp-discrete'])}")
    return SCHEDULES[name](**config)
