"""The ``tiltgen`` command line. Thin: parse, call the library, print and save."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import __version__
from ..errors import TiltgenError
from .calibrate import add_calibrate_parser
from .finetune import add_finetune_parser
from .sample import DTYPES, add_sample_parser, resume_hint, writable_dir

if TYPE_CHECKING:  # imported inside the command: the CLI starts without torch's training stack
    from ..tilt.learned import TrainConfig


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _bench_analytic(args: argparse.Namespace) -> int:
    from ..eval.analytic_bench import BenchSettings, format_markdown, format_table, run_analytic_bench

    base = BenchSettings.quick() if args.quick else BenchSettings()
    given = lambda value, default: default if value is None else value  # noqa: E731  (0 is an error, not "unset")
    settings = BenchSettings(n=given(args.n, base.n), steps=given(args.steps, base.steps),
                             sampler=args.sampler or base.sampler, floor_pairs=args.floor_pairs, seed=args.seed,
                             train_steps=given(args.train_steps, base.train_steps),
                             train_data=given(args.train_data, base.train_data),
                             train_pool=given(args.train_pool, base.train_pool),
                             timing_repeats=given(args.timing_repeats, base.timing_repeats), smc_steps=args.smc_steps)
    for path in (args.json, args.plot, args.markdown):  # fail before the work, not after it
        if path is not None and Path(path).is_dir():
            raise TiltgenError(f"output path {path} is a directory; give a file name")
    result = run_analytic_bench(args.cases, args.families, args.methods, settings, progress=not args.no_progress)
    print(format_table(result.records))
    print("(reward* = exact tilted mean reward; floor = the level the energy distance between exact samples stays "
          "below 95% of the time (1.645 x its RMS); model_ev/reward_ev/grad_ev per sample; wall_x = wall time / "
          "unguided)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.records, indent=2))
        print(f"records written to {args.json}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_markdown(result.records) + "\n")
        print(f"markdown table written to {args.markdown}")
    if args.plot:
        from ..eval.plots import plot_analytic_2d

        print(f"plot written to {plot_analytic_2d(result, args.plot)}")
    return 0


def _bench_world_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """BenchSettings fields set by --particles, --rows, --seeds and --bank."""
    out: dict[str, Any] = {}
    if args.particles is not None:
        try:
            out["particles"] = tuple(int(k) for k in args.particles.split(","))
        except ValueError:
            raise TiltgenError(f"--particles must be comma-separated integers, got {args.particles!r}") from None
    if args.rows is not None:
        out["rows"] = tuple(_csv(args.rows))
        if not out["rows"]:
            raise TiltgenError("--rows is empty; give model:method rows, e.g. diffusion:twisted-smc")
    if args.seeds is not None:
        out["seeds"] = args.seeds
    if args.bank is not None:
        out["bank"] = args.bank
    return out


def _bench_world(args: argparse.Namespace) -> int:
    import os

    from ..eval.world_bench import BenchSettings, markdown, plot, quick_settings, run_bench

    settings = quick_settings() if args.quick else BenchSettings()
    settings = dataclasses.replace(settings, **_bench_world_overrides(args))
    work = Path(args.work or os.path.join(os.path.expanduser("~"), ".cache", "tiltgen", "bench-world"))
    for target in (args.json, args.plot, args.markdown):
        if target:
            writable_dir(Path(target).parent)
    from ..core.distributed import join_processes, set_threads
    from ..eval.world_bench import fill_stages_in_parallel

    processes = join_processes("cpu")
    set_threads(processes.local_world_size, args.threads)
    start = time.perf_counter()
    if processes.distributed:  # stages split over the processes; the main one then assembles the table
        fill_stages_in_parallel(settings, work, processes, progress=not args.no_progress)
        if not processes.is_main:
            return 0
    result = run_bench(settings, work, progress=not args.no_progress)
    result.update(wall_s=time.perf_counter() - start, processes=processes.world_size)
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot(result, Path(args.plot))
    return 0


def _bench_sampling(args: argparse.Namespace) -> int:
    from ..eval.sampling_bench import run_sampling_bench, sampling_markdown

    try:
        processes = tuple(int(p) for p in args.processes)
    except ValueError:
        raise TiltgenError(f"--processes must be comma-separated integers, got {','.join(args.processes)}") from None
    if args.prompts < 1 or args.n < 1 or args.repeats < 1 or min(processes) < 1:
        raise TiltgenError("--prompts, --n, --repeats and every --processes count must be >= 1")
    if args.json:
        writable_dir(Path(args.json).parent)
    result = run_sampling_bench(model=args.model, prompts=args.prompts, n=args.n, processes=processes,
                                repeats=args.repeats, batch_size=args.batch_size, reward=args.reward or None,
                                progress=not args.no_progress)
    print(sampling_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from ..eval.memory_bench import MODELS, OPTIONS, memory_markdown, run_memory_bench

    if args.json:
        writable_dir(Path(args.json).parent)
    result = run_memory_bench(models=tuple(args.models or MODELS), options=tuple(args.options or OPTIONS),
                              batch=args.batch, steps=args.steps, method=args.method, device=args.device)
    print(memory_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _train_config(args: argparse.Namespace, beta: float, spacing: str, sampler: str,
                  times: tuple[float, ...] | None, data_dtype: str, net: dict | None = None,
                  data_steps: int | None = None) -> TrainConfig:
    from ..tilt.learned import TrainConfig

    # both need the consistency loss off (it reads the frozen model's x0_hat at fixed states)
    eta = args.eta if args.eta is not None else (0.0 if args.noise_tilt or args.fresh_noise else 1.0)
    return TrainConfig(beta=beta, net=net, loss=args.loss, eta=eta, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, n_data=args.n_data, pool_size=args.pool_size, time_levels=args.time_levels,
                       times=times, spacing=spacing, sampler=sampler, data_steps=data_steps or args.data_steps or 100,
                       trajectory=args.trajectory or args.noise_tilt, noise_tilt=args.noise_tilt,
                       data_dtype=data_dtype, checkpoint_every=args.checkpoint_every,
                       fresh_noise=args.fresh_noise, val_fraction=args.val_fraction, seed=args.seed,
                       prompt_pooling=args.prompt_pooling)


def _train_guidance(args: argparse.Namespace) -> int:
    from ..core.distributed import join_processes, set_threads
    from ..tilt.learned import train_guidance

    if (args.case is None) == (args.model is None):
        raise TiltgenError("give exactly one of --case (analytic benchmark) or --model (diffusers pipeline)")
    if args.case is not None and args.prompt_pooling != "padded":
        raise TiltgenError("--prompt-pooling chooses how a pipeline's prompts are embedded: it needs --model, not --case")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TiltgenError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise TiltgenError(f"{out} is not empty; pass --resume to continue that run, or choose a new directory")
    processes = join_processes(args.device)
    set_threads(processes.local_world_size, args.threads)
    args.device = processes.device
    processes.wait()  # every process has checked --out before any writes to it
    writable_dir(out)
    _image_recipe_defaults(args)
    if args.model is not None:
        model, schedule, reward, config, extra = _text_to_image_training(args)
    else:
        model, schedule, reward, config, extra = _analytic_training(args)
    with resume_hint(processes, f"the finished data batches and the last checkpoint are kept in {out}"):
        if args.anneal_ess is None:
            result = train_guidance(model, schedule, reward, config, out_dir=out, resume=args.resume,
                                    data_from=args.data_from, progress=not args.no_progress, processes=processes,
                                    **extra)
        else:
            result = _train_annealed(args, processes, model, schedule, reward, config, out, extra)
    if not processes.is_main:
        return 0
    rec = result.record
    print(f"trained {rec['steps']} steps: final loss {rec['final_loss']:.4f}; data {rec['data_size']} samples; "
          f"{rec['train_model_evals']} model evals, {rec['train_reward_evals']} reward evals, "
          f"{rec['train_wall_s']:.1f} s")
    ess = rec.get("weights_ess")
    if ess:
        print(f"effective samples of the exp(r/beta) weights per condition: min {ess['min']:.1f}, "
              f"median {ess['median']:.1f} (of {ess['samples_per_condition']})")
    if rec.get("anneal"):
        ladder = ", ".join(f"{s['beta']:.4g}" for s in rec["anneal"]["stages"])
        print(f"annealed in {len(rec['anneal']['stages'])} stage(s), beta = {ladder} (the base samples' weights kept "
              f"{rec['anneal']['base_weights_ess']:.1f} effective samples at the target beta)")
    if rec.get("held_out_loss") is not None:
        print(f"held-out loss {rec['held_out_loss']:.4f} at step {rec['best_step']} (the weights kept)")
    files = "guidance.json, guidance.safetensors; each stage's run in stage-<k>/" if rec.get("anneal") else \
        "guidance.json, guidance.safetensors, loss.png"
    print(f"guidance written to {out} ({files})")
    return 0


def _train_annealed(args: argparse.Namespace, processes, model, schedule, reward, config, out: Path, extra: dict):
    from ..tilt.learned.anneal import train_annealed

    if processes.distributed:
        raise TiltgenError("--anneal-ess runs in one process (its stages sample the guided model in turn); "
                           "launch it without torchrun / accelerate")
    if args.data_from:
        raise TiltgenError("--data-from cannot be combined with --anneal-ess (every stage draws its own samples)")
    return train_annealed(model, schedule, reward, config, ess_fraction=args.anneal_ess, max_stages=args.max_stages,
                          stage_particles=args.stage_particles, out_dir=out, resume=args.resume,
                          progress=not args.no_progress, **extra)


def _analytic_training(args: argparse.Namespace) -> tuple:
    from ..eval.analytic_cases import FAMILIES, get_case

    case = get_case(args.case)
    if args.family not in FAMILIES:
        raise TiltgenError(f"unknown family {args.family!r}; choose one of: {', '.join(FAMILIES)}")
    family = FAMILIES[args.family]
    args.val_fraction = args.val_fraction or 0.0
    config = _train_config(args, case.beta if args.beta is None else args.beta, family.spacing,
                           args.sampler or "heun", None, "float64")
    model = case.base.model(family.schedule, family.prediction)
    return model, family.schedule, case.reward, config, {"shape": (case.dim,)}


def _image_recipe_defaults(args: argparse.Namespace) -> None:
    """Unset --fresh-noise: on for a text-to-image model, whose guidance networks memorise a fixed pool
    of noised states (docs/learned-guidance.md), unless the run asks for what excludes it."""
    if args.fresh_noise is None:
        explicit_eta = args.eta is not None and args.eta > 0
        args.fresh_noise = args.model is not None and not (args.trajectory or args.noise_tilt or explicit_eta)


def _text_to_image_training(args: argparse.Namespace) -> tuple:
    """A prompt-conditional guidance net on a diffusers pipeline's latents (built-in models
    included); the reward is evaluated on decoded images."""
    import torch

    from ..backends.diffusers import DiffusersBackend
    from ..rewards import reward_from_spec
    from .sample import prompts_from_args

    if not args.reward:
        raise TiltgenError("--model needs --reward (the reward the guidance network learns)")
    if args.beta is None:
        raise TiltgenError("--model needs --beta (the tilt temperature)")
    prompts = prompts_from_args(args)
    if args.val_fraction is None:  # hold out whole prompts only where there are enough of them
        args.val_fraction = 0.1 if len(prompts) >= 10 else 0.0
    reward = reward_from_spec(args.reward)
    backend = DiffusersBackend.from_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]),
                                               device=args.device, cache_dir=args.cache_dir, vae_slicing=args.vae_slicing,
                                               vae_tiling=args.vae_tiling, offload=args.offload)
    backend.check_prompts(prompts)
    model = backend.at(args.height, args.width, guidance_scale=args.cfg)
    sampler = args.sampler or "ddim"
    steps = args.data_steps or backend.default_steps
    if steps == 1 and not args.noise_tilt:
        warnings.warn(f"the data are sampled in one step ({args.model}'s default, or --data-steps 1), but without "
                      "--noise-tilt the network learns an x0 shift at the sampler's states, which one-step sampling "
                      "refuses (it would only edit the output image): train with --noise-tilt to guide one-step "
                      "sampling (docs/learned-guidance.md, one-step generators)", stacklevel=2)
    # train at the model's own sampling times, the ones `tiltgen sample` will guide at
    times = tuple(float(t) for t in model.times(steps) if t > 0)
    net = None
    if args.coords:
        from ..tilt.learned.train import default_net

        net = default_net(model.latent_shape, int(model.prompt_embedding(prompts[0]).shape[-1]), coords=True)
    config = _train_config(args, args.beta, "uniform", sampler, times, "float32", net, data_steps=steps)
    encoder = functools.partial(model.prompt_embedding, pooling=args.prompt_pooling)
    extra = {"shape": model.latent_shape, "conditions": prompts, "cond_encoder": encoder}
    return model, model.schedule, model.latent_reward(reward), config, extra


def _demo(args: argparse.Namespace) -> int:
    from ..eval.world_demo import DemoSettings, parse_guidance, parse_rows, run_demo
    from ..eval.world_report import fresh_output_dir, table, write_reports
    from ..world.prompts import DEMO_PROMPTS, TWO_SHAPE_PROMPTS, held_out_prompts

    if args.prompt is not None:
        prompts, prompt_set = list(args.prompt), "custom"
    else:
        prompt_set = args.prompt_set
        prompts = {"demo": list(DEMO_PROMPTS), "heldout": held_out_prompts(),
                   "two-shape": list(TWO_SHAPE_PROMPTS)}[prompt_set]
    if args.timing_repeats < 1:
        raise TiltgenError(f"--timing-repeats must be >= 1, got {args.timing_repeats}")
    if args.best_of is not None and args.best_of < 1:
        raise TiltgenError(f"--best-of must be >= 1, got {args.best_of}")
    if args.particles < 1:
        raise TiltgenError(f"--particles must be >= 1, got {args.particles}")
    if args.bank < 2:
        raise TiltgenError(f"--bank needs at least 2 images per prompt, got {args.bank}")
    settings = DemoSettings(prompts=prompts, prompt_set=prompt_set, n=args.n, beta=args.beta, seed=args.seed,
                            rows=parse_rows(args.rows), timing_repeats=args.timing_repeats, best_of=args.best_of,
                            particles=args.particles, bank=args.bank, guidance=parse_guidance(args.guidance))
    out = writable_dir(Path(args.out) if args.out else fresh_output_dir())
    start = time.perf_counter()
    results = run_demo(settings, progress=not args.no_progress)
    paths = write_reports(results, settings, out, time.perf_counter() - start)
    summ = json.loads(paths["json"].read_text())["summary"]
    print(table(summ, ("model", "method", "proxy", "gold", "proxy_gain_std", "gold_gain_std", "fidelity", "binary",
                       "model_evals", "wall_ratio")))
    print(f"demo written to {out}: {paths['grid'].name} (rows = methods, columns = seeds of each prompt), "
          f"{paths['md'].name}, {paths['json'].name} ({time.perf_counter() - start:.0f} s)")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..builtin.catalog import catalog

    rows = catalog()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("name", "kind", "family", "pipeline", "parameters", "default_steps", "base_model", "scale", "folder")
    table = [head] + [tuple("-" if r.get(k) is None else
                            f"{r[k] / 1e6:.2f}M" if k == "parameters" else str(r[k]) for k in head) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} built-in artefacts, {total / 1e6:.1f} MB; use them as builtin:<name> "
          "(generators: --model, guidance networks: --guidance)")
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="list the built-in models, reward networks and guidance networks",
                                 description="The artefacts shipped with tiltgen: generators (diffusers pipeline "
                                             "folders), reward networks and guidance networks.")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_models)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from ..eval.world_demo import DEFAULT_BETA, DEFAULT_ROWS

    demo = commands.add_parser("demo", help="the built-in text-to-image world: every guidance method, measured",
                               description="Sample the built-in models (SD-like diffusion, its one-step distillation, "
                                           "SD3-like flow) unguided and with every guidance method on "
                                           "under-specified prompts; write grid.png, results.md and results.json.")
    demo.add_argument("--out", help="output folder (default: a fresh tiltgen-demo-<date>-<time> folder)")
    demo.add_argument("--n", type=int, default=6, help="images per prompt (default 6)")
    demo.add_argument("--beta", type=float, default=DEFAULT_BETA,
                      help=f"tilt temperature of Tweedie, training-free guidance and the exact-tilt estimate "
                           f"(default {DEFAULT_BETA}; learned networks use their own)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt-set", default="demo", choices=("demo", "heldout", "two-shape"),
                      help="demo: under-specified prompts; heldout: prompts naming (shape, colour) pairs the models "
                           "never saw; two-shape: two-shape prompts for the binary check")
    demo.add_argument("--prompt", action="append", help="custom prompt (repeatable; overrides --prompt-set)")
    demo.add_argument("--rows", help="MODEL:METHOD list (default: " + ",".join(DEFAULT_ROWS) + ")")
    demo.add_argument("--best-of", type=int, help="N of best-of-N (default: matched to the costliest guided row)")
    demo.add_argument("--particles", type=int, default=4,
                      help="particles per image of the twisted-SMC rows (diffusion:twisted-binary), default 4")
    demo.add_argument("--bank", type=int, default=32,
                      help="unguided images per prompt in the sample bank of the flow:trainingfree-bank row "
                           "(drawn, and timed, inside that row), default 32")
    demo.add_argument("--timing-repeats", type=int, default=2,
                      help="interleaved timing repeats; wall ratios use the fastest (default 2)")
    demo.add_argument("--guidance", action="append", metavar="MODEL:METHOD=FOLDER",
                      help="a guidance network of your own for a row that uses one (repeatable), e.g. "
                           "onestep:learned=runs/my-net (default: the built-in network of that row)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)


def _add_train_guidance(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train-guidance", help="train a learned guidance network",
                                description="Train a guidance network q(x_t, t) ~ h_t = E[exp(r/beta) | x_t] on "
                                            "samples of the base model: an analytic case (--case) or a diffusers "
                                            "pipeline (--model, with --reward, --beta and prompts).")
    train.add_argument("--case", help="analytic case (e.g. ring2d-linear-b2); sets model and reward")
    train.add_argument("--family", default="vp", help="with --case: vp (eps, VP-linear) or flow (velocity)")
    train.add_argument("--model", help="builtin:<name>, a built-in model folder, a diffusers save_pretrained folder "
                                       "or a cached model id")
    train.add_argument("--reward", help="with --model: reward spec, e.g. 'pickscore:1.0,aesthetic:0.5'")
    train.add_argument("--prompt", action="append", help="with --model: a training prompt (repeatable)")
    train.add_argument("--prompts", "--prompts-file", dest="prompts_file", metavar="FILE",
                       help="prompt file: .txt (one per line), .jsonl or .csv (a 'prompt' field)")
    train.add_argument("--cfg", type=float, help="with --model: classifier-free guidance scale of the sampler")
    train.add_argument("--height", type=int)
    train.add_argument("--width", type=int)
    train.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="with --model")
    train.add_argument("--device", default=None,
                       help="cpu, cuda, ... (default: this process's GPU under a launcher, else cuda if available, "
                            "else cpu)")
    train.add_argument("--threads", type=int, default=None,
                       help="intra-op CPU threads per process (default: $OMP_NUM_THREADS, else cores / local processes)")
    train.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE)")
    train.add_argument("--vae-slicing", action="store_true", help="with --model: decode one image at a time")
    train.add_argument("--vae-tiling", action="store_true", help="with --model: decode large images in tiles")
    train.add_argument("--offload", action="store_true", help="with --model: model CPU offload (GPU only)")
    train.add_argument("--out", required=True, help="output directory (checkpoints, guidance.json, loss.png)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.add_argument("--beta", type=float, help="tilt temperature (default with --case: the case's)")
    train.add_argument("--loss", default=None, help="logistic (the default), poisson, mse, or log-mse (with "
                       "--noise-tilt only, and its default there: regression on r/beta, exact for a one-step "
                       "generator's input)")
    train.add_argument("--eta", type=float, default=None,
                       help="consistency weight (0 = off; default 1, and 0 with --noise-tilt or --fresh-noise, "
                            "which need it off)")
    train.add_argument("--steps", type=int, default=1500)
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--n-data", type=int, default=4000, help="base-model samples to train on")
    train.add_argument("--pool-size", type=int, default=65536, help="noised training states")
    train.add_argument("--time-levels", type=int, default=100, help="discrete training times")
    train.add_argument("--sampler", help="sampler that generates the data (default heun; ddim with --model)")
    train.add_argument("--data-steps", type=int, default=None,
                       help="sampler steps for the data (default: 100 with --case, the model's own with --model)")
    train.add_argument("--trajectory", action="store_true", help="train on the sampler's own states")
    train.add_argument("--prompt-pooling", choices=("padded", "tokens"), default="padded",
                       help="with --model, SD 1.x/2.x: embed a prompt for the network as the mean of the text "
                            "encoder's last state over every padded position (default) or over the prompt's own "
                            "tokens (better where padding positions do not see the words); recorded with the network")
    train.add_argument("--coords", action="store_true",
                       help="with --model: give the conv guidance network x/y coordinate channels (for rewards "
                            "that depend on where things are, e.g. centring)")
    train.add_argument("--noise-tilt", action="store_true",
                       help="deterministic one-step generators: learn h of the input noise and tilt the noise "
                            "(implies --trajectory and --eta 0; needs --data-steps 1)")
    train.add_argument("--fresh-noise", action=argparse.BooleanOptionalAction, default=None,
                       help="noise the samples afresh at every step instead of a fixed pool of noised states "
                            "(implies --eta 0; no --trajectory); the network cannot memorise the noise (default: "
                            "on with --model unless --trajectory, --noise-tilt or --eta > 0; off with --case)")
    train.add_argument("--val-fraction", type=float, default=None,
                       help="share of the prompts held out; the weights kept are those with the lowest held-out "
                            "loss, checked every --checkpoint-every steps (default: 0.1 with --model and at least "
                            "10 prompts, else 0: keep the last)")
    train.add_argument("--data-from", help="reuse the samples and rewards of an earlier run folder (refused "
                                           "unless model, reward, prompts and data settings match)")
    train.add_argument("--anneal-ess", type=float, default=None, metavar="FRACTION",
                       help="train through a ladder of tilts, each stage on the previous stage's guided samples with "
                            "weights keeping at least this share of effective samples (e.g. 0.1), for tilts too "
                            "strong for the base samples (a low ESS); default: one stage")
    train.add_argument("--max-stages", type=int, default=8, help="with --anneal-ess: at most this many stages")
    train.add_argument("--stage-particles", type=int, default=1,
                       help="with --anneal-ess: draw each later stage's samples by twisted SMC with this many "
                            "particles, kept with their weights (default 1: the guided sampler's samples)")
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train_guidance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltgen", description="Reward-tilted sampling for diffusion and flow models.")
    parser.add_argument("--version", action="version", version=f"tiltgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    analytic = benches.add_parser("analytic", help="exact tilted Gaussian-mixture benchmark",
                                  description="Compare guidance methods against exact samples of the tilted target.")
    analytic.add_argument("--quick", action="store_true", help="the same grid, smaller (n=1000, 25 steps)")
    analytic.add_argument("--cases", type=_csv, help="comma-separated case names (default: all)")
    analytic.add_argument("--families", type=_csv, help="comma-separated: vp,flow (default: both)")
    analytic.add_argument("--methods", type=_csv, help="comma-separated methods (default: every default method)")
    analytic.add_argument("--n", type=int, help="samples per run (default 4000, quick 1000)")
    analytic.add_argument("--steps", type=int, help="sampler steps (default 100, quick 25)")
    analytic.add_argument("--sampler", help="heun (default), euler, ddim, ddpm or sde")
    analytic.add_argument("--floor-pairs", type=int, default=20,
                          help="exact-vs-exact pairs for the energy floor (1.645 x their RMS energy distance)")
    analytic.add_argument("--seed", type=int, default=0)
    analytic.add_argument("--json", help="write the records to this JSON file")
    analytic.add_argument("--plot", help="draw the 2-D cases to this PNG")
    analytic.add_argument("--smc-steps", type=int, default=None,
                          help="ddpm steps of the SMC rows and exact-ddpm (default: the model evaluations of one "
                               "trajectory of --sampler, so a particle costs one guided sample)")
    analytic.add_argument("--timing-repeats", type=int,
                          help="wall_s = fastest of this many interleaved timings of each method's sampling "
                               "(default 2, quick 1)")
    analytic.add_argument("--markdown", help="write the results as a Markdown table to this file")
    analytic.add_argument("--no-progress", action="store_true", help="no progress bar")
    analytic.add_argument("--train-steps", type=int, help="learned guidance: training steps (default 4000, quick 3000)")
    analytic.add_argument("--train-data", type=int, help="learned guidance: base samples it is trained on "
                                                          "(default and quick 65536)")
    analytic.add_argument("--train-pool", type=int, help="learned guidance: noised training states (default 1048576, "
                                                          "quick 262144)")
    analytic.set_defaults(func=_bench_analytic)
    world = benches.add_parser("world", help="guidance against fine-tuning on the built-in world, with compute",
                               description="Every guidance method, best-of-N, SMC and the fine-tuning baselines on "
                                           "the built-in models, on held-out prompts: proxy, gold, fidelity, binary "
                                           "success, diversity, share of the exact gain and attribute TV to p* "
                                           "(image-space importance oracle, with its ESS), and FLOPs per stage. "
                                           "Stages are cached in --work, so a killed run resumes.")
    world.add_argument("--quick", action="store_true", help="one seed, small pools and budgets (~15 min on 2 cores)")
    world.add_argument("--work", default=None, help="stage cache (default: ~/.cache/tiltgen/bench-world)")
    world.add_argument("--json", help="write the results to this JSON file")
    world.add_argument("--plot", help="write the reward-compute plot to this PNG")
    world.add_argument("--markdown", help="write the table to this Markdown file")
    world.add_argument("--threads", type=int, default=None,
                       help="intra-op CPU threads per process (default: $OMP_NUM_THREADS, else cores / local processes)")
    world.add_argument("--particles", default=None,
                       help="particle counts of the best-of-N and SMC rows, comma-separated (default 2,4; quick 2)")
    world.add_argument("--rows", default=None,
                       help="run only these model:method rows, comma-separated (e.g. diffusion:learned,"
                            "diffusion:bestofn,diffusion:twisted-smc; a model's unguided row always runs)")
    world.add_argument("--seeds", type=int, default=None,
                       help="training seeds of the learned and fine-tuning rows (default 3; quick 1; seed 0 is the "
                            "shipped guidance network)")
    world.add_argument("--bank", type=int, default=None,
                       help="unguided images per prompt in the sample bank of flow:trainingfree-bank, counted as its "
                            "data (default 32)")
    world.add_argument("--no-progress", action="store_true")
    world.set_defaults(func=_bench_world)
    sampling = benches.add_parser("sampling", help="throughput of tiltgen sample --prompts in 1 and N processes",
                                  description="Run `tiltgen sample --prompts` over a prompt file in one process and "
                                              "under torchrun with N (interleaved repeats, fastest kept) and report "
                                              "images/s, the speed-up, and the manifest and resume bookkeeping as a "
                                              "share of the sampling time.")
    sampling.add_argument("--model", default="builtin:world-onestep")
    sampling.add_argument("--prompts", type=int, default=100, help="number of prompts")
    sampling.add_argument("--n", type=int, default=1, help="images per prompt")
    sampling.add_argument("--processes", type=_csv, default=["1", "2"], help="comma-separated process counts")
    sampling.add_argument("--repeats", type=int, default=3)
    sampling.add_argument("--batch-size", type=int, default=8)
    sampling.add_argument("--reward", default="world-proxy", help="reward scored per image ('' for none)")
    sampling.add_argument("--json", help="write the results to this JSON file")
    sampling.add_argument("--no-progress", action="store_true")
    sampling.set_defaults(func=_bench_sampling)
    memory = benches.add_parser("memory", help="peak memory of guided sampling with each memory option",
                                description="Peak memory of one guided sampling call on the built-in models (or "
                                            "--models) with no option, bf16, gradient checkpointing, VAE slicing, "
                                            "VAE tiling and all together; each in a fresh process.")
    memory.add_argument("--models", type=_csv, help="comma-separated models (default: the three built-in generators)")
    memory.add_argument("--options", type=_csv, help="comma-separated options (default: all)")
    memory.add_argument("--batch", type=int, default=16)
    memory.add_argument("--steps", type=int, default=10)
    memory.add_argument("--method", default="tweedie", help="guidance method measured (default tweedie: it "
                                                            "back-propagates through the denoiser)")
    memory.add_argument("--device", default="cpu")
    memory.add_argument("--json", help="write the results to this JSON file")
    memory.set_defaults(func=_bench_memory)
    _add_train_guidance(commands)
    add_calibrate_parser(commands)
    add_finetune_parser(commands)
    add_sample_parser(commands)
    _add_demo(commands)
    _add_models(commands)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """The library's warnings as one line for a command-line user (no source path and line)."""
    print(f"tiltgen: warning: {message}", file=sys.stderr)


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that its image processors fall back to PIL without torchvision.
    tiltgen is installed without torchvision on purpose (on CPU-only machines the only builds pip
    finds are CUDA ones, which break transformers' imports); the fallback works, and the notice's
    advice to install torchvision would break it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def _quiet_known_notices() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionNotice())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_known_notices()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = args.func(args)
        if code == 0:
            from ..core.distributed import leave_processes

            leave_processes()  # only after success: a failed process's peers may never reach the barrier
        return code
    except TiltgenError as error:
        print(f"tiltgen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiltgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
