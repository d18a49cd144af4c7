"""Image-space oracle: statistics of the exact tilted distribution p* ∝ p · exp(r/β) from base samples.

Self-normalised importance sampling with weights w_i ∝ exp(r_i/β) over n base samples of one
prompt gives consistent estimates of E_p*[f] for any statistic f (a reward, fidelity, an
attribute histogram). Its effective sample size, ESS = (Σw)² / Σw², says how much to trust
them: an estimate from an ESS of 3 is a rough guide, not an oracle. Always report it.

Metrics against p*:
* fraction of the exact gain, (E_q[r] − E_p[r]) / (E*[r] − E_p[r]);
* total-variation distance between a method's attribute histograms and p*'s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import TiltgenError, check_beta

#: attribute histograms of a reading of the world's images (count per image, the rest per shape)
HISTOGRAMS = ("count", "background", "colour", "shape", "size", "position")


def snis_weights(reward: Tensor, beta: float) -> Tensor:
    """Normalised importance weights softmax(r / β) [n] (float64)."""
    check_beta(beta)
    return torch.softmax(reward.double() / beta, 0)


def effective_sample_size(weights: Tensor) -> float:
    """(Σw)² / Σw² of non-negative weights."""
    w = weights.double()
    return float(w.sum() ** 2 / (w ** 2).sum())


def snis_mean(values: Tensor, weights: Tensor) -> float:
    """Σ w f / Σ w."""
    w = weights.double()
    return float((w * values.double()).sum() / w.sum())


def weighted_histograms(readings: Sequence[Any], weights: Tensor | None = None) -> dict[str, dict[str, float]]:
    """Attribute histograms of classifier readings, each image weighted (None: equally).

    ``count`` is per image (0, 1, 2, 3+); colour, shape, size and position are per shape; the
    background is per image."""
    w = torch.ones(len(readings), dtype=torch.float64) if weights is None else weights.double()
    if len(w) != len(readings):
        raise TiltgenError(f"{len(w)} weights for {len(readings)} readings")
    out: dict[str, Counter] = {k: Counter() for k in HISTOGRAMS}
    for r, wi in zip(readings, w.tolist()):
        out["count"][str(len(r.shapes)) if len(r.shapes) < 3 else "3+"] += wi
        out["background"][r.background] += wi
        for s in r.shapes:
            for k in ("colour", "shape", "size", "position"):
                out[k][getattr(s, k)] += wi
    return {k: {v: c / total for v, c in sorted(counter.items())} if (total := sum(counter.values())) > 0 else {}
            for k, counter in out.items()}


def total_variation(a: dict[str, float], b: dict[str, float]) -> float:
    """½ Σ |a − b| over the union of the two histograms' values."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def attribute_tv(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    """Mean over attribute kinds of the total-variation distance between two sets of histograms."""
    kinds = [k for k in HISTOGRAMS if a.get(k) or b.get(k)]
    return sum(total_variation(a.get(k, {}), b.get(k, {})) for k in kinds) / max(1, len(kinds))


def fraction_of_exact_gain(method_mean: float, base_mean: float, tilted_mean: float) -> float | None:
    """(E_q[r] − E_p[r]) / (E*[r] − E_p[r]); None when the exact gain is zero."""
    gain = tilted_mean - base_mean
    return None if abs(gain) < 1e-12 else (method_mean - base_mean) / gain


@dataclass
class TiltedStatistics:
    """p*'s statistics for one prompt, estimated from ``n`` base samples."""

    prompt: str
    n: int
    ess: float
    base: dict[str, float]                  # plain means over the base samples
    tilted: dict[str, float]                # SNIS estimates under p*
    histograms: dict[str, dict[str, float]] = field(default_factory=dict)   # p*'s
    base_histograms: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "n": self.n, "ess": self.ess, "base": self.base, "tilted": self.tilted,
                "histograms": self.histograms, "base_histograms": self.base_histograms}


def tilted_statistics(prompt: str, target: Tensor, beta: float, values: dict[str, Tensor],
                      readings: Sequence[Any] | None = None) -> TiltedStatistics:
    """SNIS estimates of every statistic in ``values`` ({name: [n]}) under the tilt of ``target``
    [n] (the reward the methods optimise) at ``beta``, with the ESS."""
    n = int(target.shape[0])
    for name, v in values.items():
        if v.shape != (n,):
            raise TiltgenError(f"statistic {name!r} has shape {tuple(v.shape)}, expected [{n}]")
    w = snis_weights(target, beta)
    stats = TiltedStatistics(prompt, n, effective_sample_size(w),
                             {k: float(v.double().mean()) for k, v in values.items()},
                             {k: snis_mean(v, w) for k, v in values.items()})
    if readings is not None:
        stats.histograms = weighted_histograms(readings, w)
        stats.base_histograms = weighted_histograms(readings)
    return stats
