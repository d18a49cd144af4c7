"""Particle methods on a text-to-image model, one image at a time: shared by ``tiltgen sample
--method smc|bestofn`` and ``tiltgen.guide(pipe, method="smc"|"bestofn")``, so the two give the
same images for the same seeds.

* SMC: one population of N particles per image, seeded by the image's seed. The proposal is the
  base model, a learned network (twisted SMC: its log h_t twists, its guided drift proposes, at the
  network's own beta) or a Tweedie / training-free drift under the plug-in twist r(x0_hat)/beta.
* Best-of-N: candidate k of an image seeded s is the unguided sample of seed
  ``s + k * CANDIDATE_STRIDE`` (candidate 0 is the image's own unguided sample); the highest
  reward wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import TiltgenError, check_choice
from .estimators import CANDIDATE_STRIDE, DEFAULT_BETA, build_estimator, default_data_var, default_variant

SMC_DRIFTS = ("tweedie", "trainingfree")
PARTICLE_METHODS = ("bestofn", "smc")

#: Writes an option as the caller's user types it: ``spell("t_window")`` -> ``--t-window`` (CLI) or
#: ``t_window=`` (Python); ``spell("method", "smc")`` -> ``--method smc`` or ``method='smc'``.
Spell = Callable[..., str]


def check_particle_options(method: str, particles: Any, spell: Spell, *, guidance: Any = None, scale: Any = None,
                           t_window: Any = None, variant: Any = None, drift: Any = None, handoff: bool = False,
                           **refused_by_bestofn: Any) -> None:
    """Refuse, by the caller's own names, what a particle method (or a non-particle one) cannot take:
    the one rule set of ``tiltgen sample`` and ``tiltgen.guide``. ``refused_by_bestofn``: further
    options (given or not) that best-of-N, which guides nothing, refuses too."""
    smc, bestofn = spell("method", "smc"), spell("method", "bestofn")
    if method in PARTICLE_METHODS:
        if particles is None:
            flag = spell("particles")
            raise TiltgenError(f"{spell('method', method)} needs {flag}{'' if flag.endswith('=') else ' '}N "
                               "(candidates or particles per image)")
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise TiltgenError(f"{spell('particles')} must be an integer >= 1, got {particles!r}")
    elif particles is not None:
        raise TiltgenError(f"{spell('particles')} is for {smc} or {bestofn}, not {spell('method', method)}: the "
                           "other methods run one guided trajectory per image")
    given = {"guidance": guidance, "scale": scale, "t_window": t_window, "variant": variant, "drift": drift,
             "handoff": handoff, **refused_by_bestofn}
    named = [spell(name) for name, value in given.items() if value not in (None, False)]
    if method == "bestofn" and named:
        raise TiltgenError(f"{bestofn} keeps the best of N unguided samples; it does not take {', '.join(named)} "
                           f"({smc} with {spell('guidance')} or {spell('drift')} proposes with guidance)")
    if drift is not None:
        check_choice("SMC drift", drift, SMC_DRIFTS)
        if method != "smc" or guidance is not None:
            raise TiltgenError(f"{spell('drift')} is the proposal of {smc} without {spell('guidance')} (with "
                               f"{spell('guidance')} the network proposes)")
    if method == "smc" and variant is not None and drift is None:
        raise TiltgenError(f"{spell('variant')} chooses a Tweedie or training-free estimator; {smc} uses one only "
                           f"as its {spell('drift')}")
    if method == "smc" and guidance is None and drift is None and (scale is not None or t_window is not None):
        raise TiltgenError(f"{spell('scale')} and {spell('t_window')} shape a guided proposal: plain {smc} proposes "
                           f"with the base model (give {spell('guidance')} for twisted SMC, or {spell('drift')})")
    if handoff and not (method == "smc" and guidance is not None):
        raise TiltgenError(f"{spell('handoff', True)} hands a learned twist over to the plug-in: it needs {smc} "
                           f"with {spell('guidance')}")


@dataclass(frozen=True)
class SMCProposal:
    """How SMC proposes and twists: ``estimator`` None proposes with the base model; ``twisted``
    means the estimator's own log h_t twists (a learned network), else the plug-in r(x0_hat)/beta.
    ``beta`` is the tilt really sampled (a network's own); ``scale``, ``variant`` and ``data_var``
    are the proposal's settings after defaults, for the record."""

    estimator: Any
    twisted: bool
    beta: float
    scale: float | None = None
    variant: str | None = None
    data_var: Any = None


def smc_proposal(model: Any, reward: Any, beta: float | None, *, guidance: Any = None, drift: str | None = None,
                 scale: float | None = None, t_window: tuple[float, float] | None = None,
                 variant: str | None = None, data_var: Any = None, force_guidance: bool = False,
                 cache_dir: str | None = None, steps: int | None = None) -> SMCProposal:
    """The proposal and twist of SMC on ``model`` (a diffusers LatentModel): with ``guidance`` twisted
    SMC at the network's beta (another ``beta`` is refused by :func:`build_estimator`); with ``drift``
    (``tweedie`` or ``trainingfree``) that guidance proposes under the plug-in twist; else plain SMC."""
    if guidance is not None:
        if drift is not None:
            raise TiltgenError("with a guidance network the network proposes; a drift is for SMC without one")
        estimator, beta = build_estimator(model, "learned", None, beta, guidance=guidance, scale=scale,
                                          t_window=t_window, force_guidance=force_guidance, cache_dir=cache_dir,
                                          steps=steps)
        return SMCProposal(estimator, True, float(beta), scale=float(estimator.scale))
    beta = DEFAULT_BETA if beta is None else float(beta)
    if drift is None:
        return SMCProposal(None, False, beta)
    check_choice("SMC drift", drift, SMC_DRIFTS)
    variant = variant or ("plain" if drift == "tweedie" else default_variant(model))
    if drift == "trainingfree" and data_var is None:
        data_var = default_data_var(model)
    estimator, _ = build_estimator(model, drift, reward, beta, scale=scale, t_window=t_window, data_var=data_var,
                                   variant=variant, steps=steps)
    return SMCProposal(estimator, False, beta, float(getattr(estimator, "scale", 1.0)), variant, data_var)


def smc_image(model: Any, latent_reward: Any, proposal: SMCProposal, particles: int, cond: Any, *, seed: int,
              steps: int, handoff: bool = False, sampler: str = "ddpm") -> tuple[Tensor, dict[str, Any]]:
    """One image by SMC: (latents [1, ...], diagnostics: ``log_z``, ``resamples``, ``min_ess_frac``,
    ``ess`` per step, ``handoff_t``). ``cond`` encodes the image's prompt ``particles`` times;
    ``latent_reward`` is ``model.latent_reward(reward)``."""
    from ..tilt.particles import smc_sample

    estimator = proposal.estimator
    result = smc_sample(model, model.schedule, latent_reward, proposal.beta, n=1, particles=particles,
                        shape=model.latent_shape, cond=cond, drift=estimator,
                        twist=estimator.log_twist if proposal.twisted else None, handoff=handoff,
                        sampler=sampler, steps=steps, seed=seed)
    ess = list(result.ess or [])
    return result.samples, {"log_z": float(result.log_z[0]), "resamples": int(result.resamples),
                            "min_ess_frac": min(ess) if ess else 1.0, "ess": ess, "handoff_t": result.handoff_t}


def candidate_seed(seed: int, k: int) -> int:
    """Best-of-N: the seed of candidate k of an image seeded ``seed`` (candidate 0: the image's own)."""
    return seed + k * CANDIDATE_STRIDE


def best_candidates(reward: Any, images: Tensor, prompts: Any, particles: int) -> Tensor:
    """Best-of-N: the winning candidate [M] of each of M images, from ``images`` [M * particles, ...]
    in [0, 1] laid out image-major (image 0's candidates 0..N-1, then image 1's, ...), scored by
    ``reward`` with their ``prompts`` (the reward's condition: one per row, or one for all; checked:
    shape [M * N], finite). Of equal rewards the first wins."""
    from ..core.reward import evaluate_reward

    with torch.no_grad():
        scores = evaluate_reward(reward, images, prompts)
    return scores.reshape(-1, particles).argmax(1)
