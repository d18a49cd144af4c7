"""The learned log h_t and the guidance estimator built on it.

Parameterisation (docs/learned-guidance.md, "Keeping the x0 shift finite"):

    z          = c_in x,   c_in = 1 / sqrt(alpha^2 s_data^2 + sigma^2)
    logit(x,t) = alpha c_in s_data F_psi(z, t, e)            ~ log h_t(x) - log Z
    x0_shift   = (sigma^2 / alpha) grad_x logit = sigma^2 c_in^2 s_data grad_z F_psi

The factor alpha makes log q constant at pure noise (h_1 is constant) and cancels the
sigma^2 / alpha that turns g into the x0 shift, so the shift stays finite for flows at
t = 1 and no time window is needed; at t = 0 the shift vanishes (sigma = 0) as it must.

Noise tilt (``noise_tilt=True``, for deterministic one-step generators x0 = G(x_T)): there
h_T(x) = exp(r(G(x))/beta) is *not* constant at the start time, so the factor alpha is dropped
(logit = F_psi(c_in x, t, e)) and the tilt is applied to the generator's Gaussian input
instead of its output: x_T* = x_T + sigma_T^2 grad log q_psi(x_T), the exact tilt of
N(0, sigma_T^2 I) by a log-linear h (docs/learned-guidance.md, "One-step generators").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...core.conversions import coefficients
from ...core.schedules import Schedule
from ...errors import TiltgenError
from ..base import check_window, in_window
from ..decomposition import Tilt

CondEncoder = Callable[[Any], Tensor]  # cond -> embedding [N, E] (or [1, E], broadcast)


class GuidancePotential(nn.Module):
    """A scalar network F_psi wrapped into log q_psi(x, t) and its x0 shift (see module doc)."""

    def __init__(self, net: nn.Module, schedule: Schedule, s_data: float, noise_tilt: bool = False):
        super().__init__()
        if not s_data > 0:
            raise TiltgenError(f"s_data (the data scale) must be > 0, got {s_data}")
        self.net = net
        self.schedule = schedule
        self.s_data = float(s_data)
        self.noise_tilt = bool(noise_tilt)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def _scales(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """alpha, sigma, c_in shaped to broadcast against x: [N, 1, ...], or [1, 1, ...] (cached)
        when every row shares t, as in sampling (see ``core.conversions.coefficients``)."""
        c = coefficients(self.schedule, t, x)
        alpha, sigma = c.alpha.to(self.dtype), c.sigma.to(self.dtype)
        return alpha, sigma, torch.rsqrt(alpha**2 * self.s_data**2 + sigma**2)

    @staticmethod
    def _rows(value: Tensor) -> Tensor:
        return value.flatten()

    def logit(self, x: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        """log q_psi(x, t) [N] (an estimate of log h_t - log Z)."""
        alpha, _, c_in = self._scales(x, t)
        f = self.net(c_in * x.to(self.dtype), t.to(self.dtype), emb)
        return f if self.noise_tilt else self._rows(alpha) * self._rows(c_in) * self.s_data * f

    def logit_and_shift(self, x: Tensor, t: Tensor, emb: Tensor | None = None,
                        need_logit: bool = True) -> tuple[Tensor, Tensor]:
        """(log q_psi [N], x0 shift = (sigma^2/alpha) grad_x log q_psi, shaped like x); with
        ``noise_tilt`` the second is the input shift sigma^2 grad_x log q_psi instead."""
        alpha, sigma, c_in = self._scales(x, t)
        f, grad = self.net.value_and_grad(c_in * x.to(self.dtype), t.to(self.dtype), emb, need_logit)
        if self.noise_tilt:
            return f, sigma**2 * c_in * grad
        logit = self._rows(alpha) * self._rows(c_in) * self.s_data * f
        return logit, sigma**2 * c_in**2 * self.s_data * grad


class LearnedGuidance:
    """Guidance estimator from a trained potential: returns the x0 shift (finite at any t).

    ``cond_encoder`` maps the sampler's ``cond`` to the embedding the network was trained
    with; ``scale`` multiplies the shift (1 = the tilt at the trained beta).
    """

    needs_model_grad = False

    def __init__(self, potential: GuidancePotential, cond_encoder: CondEncoder | None = None, scale: float = 1.0,
                 t_window: tuple[float, float] | None = None, keep_noise_norm: bool = True):
        self.potential = potential.eval()
        # noise tilt: the tilted noise keeps the base noise's norm (tilt/base.py, keep_noise_norm)
        self.keep_noise_norm = bool(keep_noise_norm)
        self.cond_encoder = cond_encoder
        self.scale = float(scale)
        self.t_window = check_window(t_window)
        self.record: dict[str, Any] = {}  # the training record (guidance.json) when trained or loaded

    def save_pretrained(self, folder: Any) -> Any:
        """Write the weights, the record and a model card to ``folder`` (see :mod:`.pretrained`)."""
        from .pretrained import save_pretrained

        return save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, name_or_path: Any, model: Any = None, **kwargs: Any) -> "LearnedGuidance":
        """A folder, ``builtin:<name>`` or cached hub id; refused for another base ``model``
        unless ``force=True`` (see :func:`.pretrained.from_pretrained`)."""
        from .pretrained import from_pretrained

        return from_pretrained(name_or_path, model, **kwargs)

    def embed(self, cond: Any, n: int) -> Tensor | None:
        if self.cond_encoder is None:
            return None
        emb = self.cond_encoder(cond).to(self.potential.dtype)
        return emb.expand(n, -1) if emb.shape[0] == 1 else emb

    def log_twist(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """scale · log q_psi(x_t, t) [N]: the network's log h_t (up to a constant) as the twist of
        twisted SMC, matched to the drift this estimator proposes with (scale · its gradient)."""
        if self.potential.noise_tilt:
            raise TiltgenError("a noise-tilt network (one-step generator) has no log h_t along a diffusion path to "
                               "twist SMC with")
        with torch.no_grad():
            logit = self.potential.logit(x_t, t, self.embed(cond, x_t.shape[0]))
        return self.scale * logit.to(torch.float64)

    @property
    def tilts_input(self) -> bool:
        """True for a noise-tilt potential: GuidedModel then shifts the model's input by
        :meth:`input_shift` instead of shifting its x0 by the estimator's Tilt."""
        return self.potential.noise_tilt

    def _shift(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        # no_grad, not inference_mode: the conv net re-enables autograd for its input gradient
        with torch.no_grad():
            _, shift = self.potential.logit_and_shift(x_t, t, self.embed(cond, x_t.shape[0]), need_logit=False)
        shift = shift.to(x_t.dtype)
        tilt = Tilt(x0_shift=shift if self.scale == 1 else shift * self.scale)
        keep = in_window(t, self.t_window)
        return (tilt if keep is None else tilt.masked(keep)).value

    def input_shift(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """Noise tilt: sigma^2 grad log q_psi(x_t), to be added to the model's input."""
        if not self.tilts_input:
            raise TiltgenError("this guidance network shifts x0, not the model input (it was not trained with noise_tilt)")
        return self._shift(x_t, t, cond)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        if self.tilts_input:
            raise TiltgenError("a noise-tilt guidance network shifts the model input; wrap the model in GuidedModel")
        return Tilt(x0_shift=self._shift(x_t, t, cond))
