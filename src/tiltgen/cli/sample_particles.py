"""``tiltgen sample --method bestofn|smc``: particle methods on a diffusers pipeline, one image at a time.

Each image depends only on its own seed, never on the batch it is in (so a killed run resumes to
the same images): best-of-N draws candidate k of an image with seed ``seed + k * CANDIDATE_STRIDE``
(candidate 0 is the unguided image of that seed), and SMC runs one population of N particles per
image from a generator seeded with the image's seed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import TiltgenError
from ..eval.particle_images import PARTICLE_METHODS, check_particle_options

#: Prefixes of the per-image diagnostics these methods add to the manifest.
DIAGNOSTIC_PREFIXES = ("smc:", "bestofn:")


def _spell(name: str, value: Any = None) -> str:
    """An option as the command line writes it: ``--t-window``, ``--method smc``."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None or value is True else f"{flag} {value}"


def check_particle_args(args: argparse.Namespace) -> None:
    """Validate the particle options before any model loads."""
    check_particle_options(args.method, args.particles, _spell, guidance=args.guidance, scale=args.scale,
                           t_window=args.t_window, variant=args.variant, drift=args.drift, handoff=args.handoff)
    if args.method in PARTICLE_METHODS and not args.reward:
        raise TiltgenError(f"--method {args.method} needs --reward (the reward that picks or weighs the particles)")
    if args.method == "bestofn" and args.beta is not None:
        print("tiltgen: warning: --beta is ignored with --method bestofn (it keeps the highest reward; use "
              "--method smc to sample the tilt at a beta)", file=sys.stderr)
        args.beta = None  # the manifest must not claim a tilt


Sampler = Callable[[list], Tensor]


def particle_sampler(args: argparse.Namespace, model: Any, reward: Any, steps: int, sampler: str,
                     encode: Callable[[list], Any], diagnostics: dict[str, dict[str, float]]) -> Sampler:
    """``sample(chunk) -> images`` for ``--method bestofn|smc``; per-image diagnostics (the chosen
    candidate; SMC's log Z estimate, resamplings and lowest ESS / N) go into ``diagnostics`` by image file.
    Records the beta SMC really tilts at in ``args.beta`` (a network's own with --guidance)."""
    if args.method == "bestofn":
        return _best_of(args, model, reward, steps, sampler, encode, diagnostics)
    return _smc(args, model, reward, steps, sampler, encode, diagnostics)


def _best_of(args: argparse.Namespace, model: Any, reward: Any, steps: int, sampler: str,
             encode: Callable[[list], Any], diagnostics: dict[str, dict[str, float]]) -> Sampler:
    from ..eval.particle_images import best_candidates, candidate_seed
    from ..eval.sample_job import chunked

    big_n = args.particles

    def sample(chunk: list) -> Tensor:
        pairs = [(item, k) for item in chunk for k in range(big_n)]
        images = []
        for part in chunked(pairs, args.batch_size):  # type: ignore[arg-type]
            cond = encode([item for item, _ in part])
            seeds = [candidate_seed(item.seed, k) for item, k in part]
            images.append(model.sample(cond, seeds=seeds, steps=steps, sampler=sampler, progress=False).images)
        candidates = torch.cat(images)
        best = best_candidates(reward, candidates, [str(item.prompt) for item, _ in pairs], big_n)
        for item, k in zip(chunk, best.tolist()):
            diagnostics[item.file] = {"bestofn:candidate": float(k)}
        return candidates.reshape((len(chunk), big_n) + candidates.shape[1:])[torch.arange(len(chunk)), best]

    return sample


def _smc(args: argparse.Namespace, model: Any, reward: Any, steps: int, sampler: str,
         encode: Callable[[list], Any], diagnostics: dict[str, dict[str, float]]) -> Sampler:
    from ..eval.particle_images import smc_image, smc_proposal

    proposal = smc_proposal(model, reward, args.beta, guidance=args.guidance, drift=args.drift, scale=args.scale,
                            t_window=tuple(args.t_window) if args.t_window else None, variant=args.variant,
                            data_var=args.data_var, force_guidance=args.force_guidance, cache_dir=args.cache_dir,
                            steps=steps)
    args.beta, args.scale = proposal.beta, proposal.scale  # for the manifest: what was really sampled
    if args.drift:
        args.variant, args.data_var = proposal.variant, proposal.data_var
    latent_reward = model.latent_reward(reward)
    big_n = args.particles

    def sample(chunk: list) -> Tensor:
        images = []
        for item in chunk:
            latents, found = smc_image(model, latent_reward, proposal, big_n, encode([item] * big_n), seed=item.seed,
                                       steps=steps, handoff=args.handoff, sampler=sampler)
            images.append(model.decode(latents))
            diagnostics[item.file] = {"smc:log_z": found["log_z"], "smc:resamples": float(found["resamples"]),
                                      "smc:min_ess_frac": found["min_ess_frac"]}
        return torch.cat(images)

    return sample
