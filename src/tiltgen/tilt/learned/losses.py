"""Training objectives. All take the network's logit l = log q_psi [B] and the per-condition
normalised weights w = exp(r/beta) / mean_c exp(r/beta) [B] of the same noised samples.

Each has the pointwise minimiser q = E[w | x_t, c] = h_t(x_t, c) / Z_hat(c)
(docs/learned-guidance.md derives them):

* ``mse``       (exp(l) - w)^2                        plain regression of the weights
* ``poisson``   exp(l) - w l                          Bregman (Poisson) regression in log space
* ``logistic``  w softplus(-l) + softplus(l)          density ratio: positives weighted w,
                                                      negatives unweighted, same states

except ``log-mse``, (l - log w)^2, whose minimiser is E[log w | x_t], not log E[w | x_t]. The two
agree only where the reward is a function of the state, as for a deterministic one-step
generator's input noise (the noise tilt), where log h(x_T) = r(G(x_T))/beta exactly: there every
sample carries its whole log-weight into the fit, where the other losses hear mostly from the
few samples that dominate exp(r/beta) at small beta. ``TrainConfig`` allows it only with
``noise_tilt``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import softplus

from ...errors import check_choice

LOSSES = ("logistic", "poisson", "mse", "log-mse")
EXACT_STATE_LOSSES = ("log-mse",)  # need a reward that is a function of the state (noise tilt)
_MAX_LOGIT = 30.0  # exp() guard for the regression losses; far beyond any sane log h_t - log Z


def tilt_loss(kind: str, logit: Tensor, w: Tensor) -> Tensor:
    """Mean loss of one batch (scalar). ``w`` may be float64: ``log-mse`` takes its log before casting,
    so weights far below float32's range keep their log-weight."""
    check_choice("guidance loss", kind, LOSSES)
    if kind == "log-mse":
        return ((logit - torch.log(w).to(logit.dtype)) ** 2).mean()
    w = w.to(logit.dtype)
    if kind == "logistic":
        return (w * softplus(-logit) + softplus(logit)).mean()
    q = torch.exp(logit.clamp(max=_MAX_LOGIT))
    if kind == "poisson":
        return (q - w * logit).mean()
    return ((q - w) ** 2).mean()


def consistency_loss(x0_hat: Tensor, shift: Tensor, x0: Tensor, w: Tensor, s_data: float) -> Tensor:
    """Importance-weighted denoising loss of the tilted denoiser x0_hat + shift on tilted data.

    E[w |x0_hat + shift - x0|^2] is minimised by shift = E_w[x0 | x_t] - x0_hat, which is
    E_{p*}[x0 | x_t] - E_p[x0 | x_t] when x0_hat is the frozen model's posterior mean.
    Scaled by 1/s_data^2 and averaged over dimensions, so its size does not depend on data units.
    """
    err = ((x0_hat + shift - x0) ** 2).flatten(1).mean(1) / s_data**2
    return (w * err).mean()
