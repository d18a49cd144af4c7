"""Training-free guidance: the tilt of a Gaussian posterior proxy around x0_hat.

The exact guidance term (DESIGN.md §2) is the shift of the posterior mean,

    x0_shift = E_{p*}[x0 | x_t] - E_p[x0 | x_t],   p*(x0 | x_t) ∝ p(x0 | x_t) exp(r(x0) / beta).

We replace the unknown posterior p(x0 | x_t) by the posterior a Gaussian prior
N(m, s^2 I) with the data's per-dimension variance s^2 would give, re-centred on the
model's own x0_hat:

    q_t(x0 | x_t) = N(x0_hat, nu_t I),   nu_t = s^2 sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2).

With a per-element variance or a full data covariance S the proxy is N(x0_hat, C_t),
C_t = sigma_t^2 S (alpha_t^2 S + sigma_t^2 I)^-1, and every formula below holds with nu_t
replaced by C_t (the bounded and SNIS variants in S's whitened coordinates).

nu_t needs no model evaluation: it is s^2 at pure noise (alpha = 0, where the posterior is
the prior) and ~ sigma_t^2 / alpha_t^2 -> 0 at data. Tilting q_t gives the variants:

* ``linear``  x0_shift = nu_t grad r(x0_hat) / beta. Exact for a Gaussian posterior and a
  linear reward (so: a single Gaussian base with s^2 its variance, linear reward).
* ``bounded`` (default) the tilt of the two-point proxy x0_hat +- sqrt(nu_t) u along
  u = grad r / |grad r|: sqrt(nu_t) tanh(sqrt(nu_t) |grad r| / beta) u. Equal to ``linear``
  for weak tilts, but never more than one proxy standard deviation: a Gaussian's tilted
  mean grows without bound as beta shrinks, a multimodal posterior's does not.
* ``newton``  solves (I + nu_t A / beta) x0_shift = nu_t grad r(x0_hat) / beta by a few
  conjugate-gradient steps, with A v taken from differences of reward gradients
  (A = -Hessian of r). Exact for a Gaussian posterior and a quadratic reward; equals
  ``linear`` for a linear reward. Accounts for reward curvature, which ``linear``
  (and the Tweedie plug-in) ignore and so overshoot on peaked rewards.
* ``snis``    self-normalised importance sampling of the tilted proxy from K fixed
  antithetic draws x0_hat + sqrt(nu_t) z_k with weights exp(r / beta): reward *values*
  only, so non-differentiable rewards work; the shift is bounded by the draws' spread.

None backpropagates through the generator; model evaluations equal the unguided
sampler's. Reward gradients are taken at x0_hat (detached; ``newton`` also at nearby points).
At t = 0 every variant gives g = grad r / beta, exact; at t = 1 the shift is finite (the
x0 form is returned, so nothing divides by alpha = 0). See docs/training-free-guidance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..core.conversions import coefficients
from ..core.reward import Reward, as_reward, evaluate_reward, reward_gradient, reward_name
from ..core.schedules import Schedule
from ..errors import TiltgenError, check_beta, check_choice
from .bank import DEFAULT_BANDWIDTH, SampleBank, bandwidth_factor, bank_shift
from .base import check_window, in_window, per_sample_dot
from .decomposition import Tilt

VARIANTS = ("linear", "bounded", "newton", "snis")


def posterior_variance(schedule: Schedule, t: Tensor, x: Tensor, data_var: float | Tensor) -> Tensor:
    """nu_t = s^2 sigma^2 / (alpha^2 s^2 + sigma^2), shaped to broadcast against ``x``
    ([N, 1, ...], or [1, 1, ...] when every sample shares t: the cached sampler case; a
    per-element ``data_var`` tensor broadcasts in)."""
    c = coefficients(schedule, t, x)
    sigma2 = c.sigma**2
    return data_var * sigma2 / (c.alpha**2 * data_var + sigma2)


@dataclass(frozen=True)
class ProxyPosterior:
    """The proxy posterior's covariance C_t at one step.

    Diagonal when ``basis`` is None (``nu`` broadcasts against a batch [N, ...]); otherwise
    C_t = basis diag(nu) basis^T with ``basis`` [D, D] the data covariance's eigenvectors and
    ``nu`` [N or 1, D] its posterior eigenvalues, D the elements of one sample.
    """

    nu: Tensor
    basis: Tensor | None = None

    def apply(self, v: Tensor, power: float = 1.0) -> Tensor:
        """C_t^power v  [N, ...] (power 1 or 1/2)."""
        nu = self.nu if power == 1.0 else self.nu**power
        if self.basis is None:
            return nu * v
        return (((v.flatten(1) @ self.basis) * nu) @ self.basis.T).reshape(v.shape)

    def sqrt_draws(self, z: Tensor) -> Tensor:
        """C_t^(1/2) z_k for draws ``z`` [K, ...] of one sample's shape: [K, N or 1, ...]."""
        root = self.nu.sqrt()
        if self.basis is None:
            return root[None] * z[:, None]
        k = z.shape[0]
        rotated = (z.reshape(k, 1, -1) @ self.basis) * root[None]
        return (rotated @ self.basis.T).reshape((k, -1) + tuple(z.shape[1:]))


def _newton_shift(reward: Reward, x0: Tensor, cond: Any, post: ProxyPosterior, beta: float, steps: int) -> Tensor:
    """The tilted mean of N(x0, C) under the reward's quadratic model, by CG in whitened
    coordinates: (I + M) y = C^(1/2) grad r(x0) / beta, shift = C^(1/2) y, with
    M y = C^(1/2) (grad r(x0) - grad r(x0 + C^(1/2) y)) / beta.

    M is exact for a quadratic reward (M = C^(1/2) A C^(1/2) / beta, symmetric, so CG applies)
    and a secant otherwise.
    """
    g0 = reward_gradient(reward, x0, cond)
    b = post.apply(g0, 0.5) / beta
    y, res, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = per_sample_dot(res, res)
    for _ in range(steps):
        mp = post.apply(g0 - reward_gradient(reward, x0 + post.apply(p, 0.5), cond), 0.5) / beta
        ap = p + mp
        denom = per_sample_dot(p, ap)
        # (I + M) is positive definite for concave rewards; stop a direction where it is not.
        step = torch.where(denom > 1e-30, rr / denom.clamp_min(1e-30), torch.zeros_like(denom))
        y = y + step * p
        res = res - step * ap
        rr_new = per_sample_dot(res, res)
        p = res + torch.where(rr > 1e-30, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr)) * p
        rr = rr_new
    return post.apply(y, 0.5)


def _bounded_shift(grad: Tensor, post: ProxyPosterior, beta: float) -> Tensor:
    """tanh(q / beta) C grad / q, q = sqrt(grad^T C grad)  [N, ...]: the tilt of the two-point
    proxy x0_hat +- C^(1/2) u (u the unit whitened gradient C^(1/2) grad / q) under the
    linearised reward. For C = nu I it is sqrt(nu) tanh(sqrt(nu) |grad| / beta) grad / |grad|."""
    c_grad = post.apply(grad)
    a = per_sample_dot(grad, c_grad).clamp_min(0).sqrt() / beta
    # tanh(a) / a -> 1 as a -> 0 (the linear shift); the clamp only guards a zero gradient
    return c_grad * (torch.tanh(a) / a.clamp_min(1e-30) / beta)


def _draws(k: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """k fixed antithetic standard-normal draws [k, *shape] (the same for every sample and step,
    so the guided ODE stays a deterministic function of its state). When k/2 >= dim they are
    whitened (sample covariance exactly I), so SNIS reproduces the linear shift for weak tilts."""
    half = torch.randn((k // 2,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = half.reshape(k // 2, -1)
    if flat.shape[0] >= flat.shape[1]:
        chol = torch.linalg.cholesky(flat.T @ flat / flat.shape[0])
        flat = torch.linalg.solve_triangular(chol, flat.T, upper=False).T
    half = flat.reshape(half.shape)
    return torch.cat([half, -half]).to(dtype=dtype, device=device)


def _snis_shift(reward: Reward, x0: Tensor, cond: Any, post: ProxyPosterior, beta: float, z: Tensor) -> Tensor:
    """sum_k w_k C^(1/2) z_k, w = softmax_k(r(x0 + C^(1/2) z_k) / beta)  [N, ...]."""
    k, n = z.shape[0], x0.shape[0]
    delta = post.sqrt_draws(z)  # [k, N or 1, ...]
    points = (x0[None] + delta).reshape((k * n,) + x0.shape[1:])
    cond_k = cond if cond is None else _repeat_cond(cond, k)
    log_w = evaluate_reward(reward, points, cond_k).reshape(k, n) / beta
    weights = torch.softmax(log_w, 0).reshape((k, n) + (1,) * (x0.ndim - 1))
    return (weights * delta).sum(0)


def _repeat_cond(cond: Any, k: int) -> Any:
    """Conditioning for k stacked copies of the batch (tensors and lists are tiled)."""
    if isinstance(cond, Tensor):
        return cond.repeat((k,) + (1,) * (cond.ndim - 1))
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * k)
    return cond


class TrainingFreeGuidance:
    """Training-free guidance: the tilt of the proxy posterior N(x0_hat, C_t) (module docstring).

    The proxy prior is N(m, S): ``data_var`` gives S = s^2 I (a float: 1 for latents
    normalised by their scaling factor, else estimate it from a few unguided samples) or a
    per-element variance (a tensor that broadcasts to one sample's shape, e.g. [C, 1, 1] per
    latent channel); ``data_cov`` gives a full covariance [D, D] over one flattened sample
    (D elements; for low-dimensional data, estimated from unguided samples). Then
    C_t = sigma^2 S (alpha^2 S + sigma^2 I)^-1. ``variant`` is one of ``bounded`` (default:
    chosen by the analytic benchmark), ``linear``, ``newton`` (``cg_steps`` extra reward
    gradients per call), ``snis`` (``draws`` reward values per sample per call, no gradient).
    ``scale`` multiplies the shift; ``t_window`` restricts guidance to t in [lo, hi].

    ``bank`` (a :class:`~tiltgen.tilt.bank.SampleBank` of unguided samples of the base model
    for the condition being sampled, or a mapping prompt -> SampleBank for prompt-conditional
    models, each row then using its own prompt's bank) replaces the Gaussian prior by the
    samples' kernel density with kernel h^2 S, h = ``bandwidth`` * M^(-1/(D+4)): the proxy
    posterior becomes a mixture whose components the tilt reweights, so guidance can move
    samples between modes (tilt/bank.py; docs/training-free-guidance.md, "A sample bank").
    """

    needs_model_grad = False

    def __init__(self, reward: Reward, beta: float, schedule: Schedule, *, data_var: float | Tensor | None = None,
                 data_cov: Tensor | None = None, variant: str = "bounded", scale: float = 1.0,
                 t_window: tuple[float, float] | None = None, cg_steps: int = 2, draws: int = 16, seed: int = 0,
                 bank: SampleBank | Mapping[str, SampleBank] | None = None,
                 bandwidth: float = DEFAULT_BANDWIDTH):
        self.reward = as_reward(reward)
        self.variant = check_choice("training-free variant", variant, VARIANTS)
        if variant != "snis" and not self.reward.differentiable:
            raise TiltgenError(f"training-free variant {variant!r} needs a differentiable reward; "
                               f"{reward_name(self.reward)!r} is not: use variant='snis' (reward values only)")
        self.beta = check_beta(beta)
        self.schedule = schedule
        if data_var is not None and data_cov is not None:
            raise TiltgenError("give data_var (per-element variance) or data_cov (full covariance), not both")
        self.data_var = _check_data_var(1.0 if data_var is None else data_var)
        self.cov_basis, self.cov_eigenvalues = (None, None) if data_cov is None else _eigen(data_cov)
        self.scale = float(scale)
        self.t_window = check_window(t_window)
        if cg_steps < 1:
            raise TiltgenError(f"cg_steps must be >= 1, got {cg_steps}")
        if draws < 2 or draws % 2:
            raise TiltgenError(f"draws must be an even number >= 2 (antithetic pairs), got {draws}")
        self.cg_steps = int(cg_steps)
        self.draws = int(draws)
        self.seed = int(seed)
        if isinstance(bank, Mapping) and not bank:
            raise TiltgenError("bank is an empty mapping: give one SampleBank per prompt")
        # a plain dict is checked now; another mapping (banks drawn on first use) when each is used
        for one in bank.values() if isinstance(bank, dict) else [] if isinstance(bank, Mapping) else [bank]:
            if one is not None:
                _check_bank(one)
        if not bandwidth > 0 or not math.isfinite(bandwidth):
            raise TiltgenError(f"bandwidth must be finite and > 0, got {bandwidth}")
        self.bank = bank
        self.bandwidth = float(bandwidth)

    def posterior(self, t: Tensor, x0: Tensor, factor: float = 1.0) -> ProxyPosterior:
        """C_t for the batch ``x0`` [N, ...] at times ``t``, of the prior ``factor`` * S (a sample
        bank's kernel components use factor = h^2)."""
        if self.cov_basis is None:
            data_var = self.data_var
            if isinstance(data_var, Tensor):
                _check_broadcast(data_var, x0)
                data_var = data_var.to(dtype=x0.dtype, device=x0.device)
            return ProxyPosterior(posterior_variance(self.schedule, t, x0, factor * data_var))
        dim = x0[0].numel()
        if self.cov_basis.shape[0] != dim:
            raise TiltgenError(f"data_cov is {self.cov_basis.shape[0]}x{self.cov_basis.shape[0]} but one sample has "
                               f"{dim} elements (shape {tuple(x0.shape[1:])})")
        # the same formula on the covariance's eigenvalues: [N or 1, D] against flattened samples
        nu = posterior_variance(self.schedule, t, x0.flatten(1),
                                factor * self.cov_eigenvalues.to(dtype=x0.dtype, device=x0.device))
        return ProxyPosterior(nu, self.cov_basis.to(dtype=x0.dtype, device=x0.device))

    def x0_shift(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tensor:
        """The estimated E*[x0 | x_t] - E[x0 | x_t]  [N, ...]."""
        x0 = x0_hat.detach()
        if self.bank is None:
            return self._variant_shift(x0, cond, self.posterior(t, x0))
        if isinstance(self.bank, SampleBank):
            return self._banked_shift(self.bank, x_t, t, cond, x0)
        shift = torch.empty_like(x0)
        t = t.expand(x0.shape[0]) if t.ndim else t.reshape(1).expand(x0.shape[0])
        for prompt, rows in _rows_by_prompt(cond, x0.shape[0]).items():
            if prompt not in self.bank:
                known = ", ".join(repr(p) for p in list(self.bank)[:5])
                raise TiltgenError(f"no sample bank for the prompt {prompt!r} (banks for: {known}"
                                   f"{', ...' if len(self.bank) > 5 else ''})")
            index = torch.as_tensor(rows, dtype=torch.long, device=x0.device)
            shift[index] = self._banked_shift(self.bank[prompt], x_t[index], t[index], _select_cond(cond, rows),
                                              x0[index])
        return shift

    def _banked_shift(self, bank: SampleBank, x_t: Tensor, t: Tensor, cond: Any, x0: Tensor) -> Tensor:
        """The between-component shift of ``bank``'s kernel mixture plus the variant's tilt of one
        component, whose covariance is C_t of the kernel h^2 S."""
        _check_bank(bank)
        shape = tuple(x0.shape[1:])
        if tuple(bank.x0.shape[1:]) != shape:
            raise TiltgenError(f"the sample bank holds samples of shape {tuple(bank.x0.shape[1:])}, but the model's "
                               f"samples have shape {shape}")
        post = self.posterior(t, x0, bandwidth_factor(bank, self.bandwidth))  # checks S against the samples
        if self.cov_basis is None:
            spectrum = torch.as_tensor(self.data_var, dtype=torch.float64).expand(shape).flatten()
        else:
            spectrum = self.cov_eigenvalues
        between = bank_shift(bank, x_t, t, self.schedule, spectrum, self.cov_basis, self.beta, self.bandwidth)
        return between + self._variant_shift(x0, cond, post)

    def _variant_shift(self, x0: Tensor, cond: Any, post: ProxyPosterior) -> Tensor:
        """The tilt of the Gaussian proxy N(x0, C_t) under this variant  [N, ...]."""
        if self.variant == "linear":
            return post.apply(reward_gradient(self.reward, x0, cond)) / self.beta
        if self.variant == "bounded":
            return _bounded_shift(reward_gradient(self.reward, x0, cond), post, self.beta)
        if self.variant == "newton":
            return _newton_shift(self.reward, x0, cond, post, self.beta, self.cg_steps)
        z = _draws(self.draws, tuple(x0.shape[1:]), x0.dtype, x0.device, self.seed)
        return _snis_shift(self.reward, x0, cond, post, self.beta, z)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        keep = in_window(t, self.t_window)
        if keep is not None and not bool(keep.any()):
            return Tilt(x0_shift=torch.zeros_like(x0_hat))  # no reward evaluations outside the window
        shift = self.x0_shift(x_t, t, cond, x0_hat)
        tilt = Tilt(x0_shift=shift if self.scale == 1.0 else shift * self.scale)
        return tilt if keep is None else tilt.masked(keep)


def _check_bank(bank: Any) -> None:
    if not isinstance(bank, SampleBank):
        raise TiltgenError(f"bank must be a SampleBank (SampleBank.from_samples(x0, reward)) or a mapping "
                           f"prompt -> SampleBank, got {type(bank).__name__}")


def _row_prompts(cond: Any, n: int) -> list[str]:
    """The prompt of each of the n rows: from a condition's ``prompts``, a list of strings or one string."""
    prompts = getattr(cond, "prompts", cond)
    if isinstance(prompts, str):
        return [prompts] * n
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if len(prompts) == n:
            return list(prompts)
        if len(prompts) == 1:
            return list(prompts) * n
        raise TiltgenError(f"{len(prompts)} prompts for {n} samples")
    raise TiltgenError("per-prompt sample banks need prompts as the condition (a string, a list of strings, "
                       f"or a condition with .prompts), got {type(cond).__name__}")


def _rows_by_prompt(cond: Any, n: int) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, prompt in enumerate(_row_prompts(cond, n)):
        rows.setdefault(prompt, []).append(i)
    return rows


def _select_cond(cond: Any, rows: list[int]) -> Any:
    """The condition of the rows ``rows``: ``select`` of a condition object, a sub-list, or as it is."""
    if hasattr(cond, "select"):
        return cond.select(rows)
    if isinstance(cond, (list, tuple)) and len(cond) > 1:
        return [cond[i] for i in rows]
    return cond


def _check_data_var(data_var: float | Tensor) -> float | Tensor:
    """A positive finite float, or a tensor of them (per-element variances)."""
    values = torch.as_tensor(data_var, dtype=torch.float64)
    if values.numel() == 0 or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise TiltgenError(f"data_var must be finite and > 0 (a number or a tensor of per-element variances), "
                           f"got {data_var!r}")
    return float(values) if values.numel() == 1 else values


def _check_broadcast(data_var: Tensor, x0: Tensor) -> None:
    try:
        shape = torch.broadcast_shapes(tuple(data_var.shape), tuple(x0.shape[1:]))
    except RuntimeError:
        shape = None
    if shape != tuple(x0.shape[1:]):
        raise TiltgenError(f"data_var of shape {tuple(data_var.shape)} does not broadcast to one sample's shape "
                           f"{tuple(x0.shape[1:])}")


def _eigen(data_cov: Tensor) -> tuple[Tensor, Tensor]:
    """The eigenvectors [D, D] and eigenvalues [D] of a symmetric positive-definite ``data_cov``."""
    cov = torch.as_tensor(data_cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
        raise TiltgenError(f"data_cov must be a square [D, D] matrix over one flattened sample, got shape "
                           f"{tuple(cov.shape)}")
    if not bool(torch.isfinite(cov).all()):
        raise TiltgenError("data_cov has non-finite entries")
    if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-9 * float(cov.abs().max())):
        raise TiltgenError("data_cov must be symmetric")
    eigenvalues, basis = torch.linalg.eigh(0.5 * (cov + cov.T))
    if float(eigenvalues.min()) <= 0:
        raise TiltgenError(f"data_cov must be positive definite; its smallest eigenvalue is {float(eigenvalues.min()):.3g}")
    return basis, eigenvalues
