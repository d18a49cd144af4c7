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

PARTICLE_METHODS = ("bestofn", "smc")
#: Prefixes of the per-image diagnostics these methods add to the manifest.
DIAGNOSTIC_PREFIXES = ("smc:", "bestofn:")


def check_particle_args(args: argparse.Namespace) -> None:
    """Validate the particle options before any model loads."""
    particles = args.method in PARTICLE_METHODS
    if particles and args.particles is None:
        raise TiltgenError(f"--method {args.method} needs --particles N (candidates or particles per image)")
    if not particles and args.particles is not None:
        raise TiltgenError(f"--particles is for --method bestofn or smc, not --method {args.method}")
    if args.particles is not None and args.particles < 1:
        raise TiltgenError(f"--particles must be >= 1, got {args.particles}")
    if particles and not args.reward:
        raise TiltgenError(f"--method {args.method} needs --reward (the reward that picks or weighs the particles)")
    if args.handoff and not (args.method == "smc" and args.guidance):
        raise TiltgenError("--handoff hands a learned twist over to the plug-in: it needs --method smc with --guidance")
    if args.method == "bestofn":
        given = [flag for flag, value in (("--guidance", args.guidance), ("--scale", args.scale),
                                          ("--t-window", args.t_window), ("--variant", args.variant)) if value]
        if given:
            raise TiltgenError(f"--method bestofn keeps the best of N unguided samples; {', '.join(given)} "
                               "would guide them (use --method smc --guidance for a learned proposal)")
        if args.beta is not None:
            print("tiltgen: warning: --beta is ignored with --method bestofn (it keeps the highest reward; use "
                  "--method smc to sample the tilt at a beta)", file=sys.stderr)
            args.beta = None  # the manifest must not claim a tilt
    if args.drift and (args.method != "smc" or args.guidance):
        raise TiltgenError("--drift is the proposal of --method smc without --guidance (with --guidance the network "
                           "proposes)")
    if args.method == "smc" and args.variant and not args.drift:
        raise TiltgenError("--variant chooses a training-free or Tweedie estimator; --method smc uses one only as "
                           "its --drift")
    if args.method == "smc" and not (args.guidance or args.drift) and (args.scale is not None or args.t_window):
        raise TiltgenError("--scale and --t-window shape a guided proposal: plain --method smc proposes with the "
                           "base model (give --guidance for twisted SMC, or --drift)")


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
