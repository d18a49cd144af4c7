"""Guidance networks as shareable folders, like a LoRA: ``save_pretrained`` / ``from_pretrained``.

A folder holds ``guidance.json`` (the network, schedule and training record: base model name
and fingerprint, reward, beta, training prompts, data size, tiltgen version),
``guidance.safetensors`` (the weights) and ``README.md`` (a model card saying the same for a
reader). ``from_pretrained`` takes a folder, ``builtin:<name>`` or a Hugging Face model id
found in the local cache (never downloaded), and refuses a network trained for another base
model, naming both fingerprints, unless ``force=True``.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ...core.files import atomic_write, write_json
from ...errors import TiltgenError
from ...hub import cached_snapshot, hf_cache_dir, looks_like_model_id
from .potential import CondEncoder, LearnedGuidance

CONFIG = "guidance.json"
WEIGHTS = "guidance.safetensors"
CARD = "README.md"
EXAMPLE_PROMPTS = 12  # training prompts quoted in the card (all are in guidance.json)
PROMPT_POOLINGS = ("padded", "tokens")  # how a backend embeds a prompt for the network (its prompt_embedding)


def tiltgen_version() -> str:
    from ... import __version__

    return __version__


def resolve_guidance_path(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                          revision: str | None = None) -> Path:
    """The folder of a guidance network: ``builtin:<name>``, a local folder, or ``org/name`` in
    the local Hugging Face cache."""
    from ...builtin import PREFIX, resolve_weights

    text = str(name_or_path)
    if text.startswith(PREFIX):
        return resolve_weights(text, "guidance")
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_model_id(text):
        try:
            return cached_snapshot(text, cache_dir=cache_dir, revision=revision)
        except LookupError:
            raise TiltgenError(f"guidance network {text!r} is neither a folder nor in the local Hugging Face cache "
                               f"({hf_cache_dir(cache_dir)}); tiltgen never downloads: fetch it first, e.g. "
                               f"`huggingface-cli download {text}`") from None
    raise TiltgenError(f"guidance path {path} does not exist")


def read_guidance_record(folder: Path) -> dict[str, Any]:
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise TiltgenError(f"{folder} has no trained guidance ({CONFIG} + {WEIGHTS})")
    try:
        return json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as error:
        raise TiltgenError(f"cannot read {folder / CONFIG}: {error}") from None


def recorded_conditions(record: dict, key: str = "conditions") -> list[Any]:
    """The conditions a training record lists under ``key`` (``conditions``: every training prompt,
    ``held_out_conditions``: those held out), back from the reprs the record keeps."""
    return [ast.literal_eval(c) for c in record.get(key) or []]


def check_base_model(record: dict, model: Any, path: Any, force: bool = False) -> None:
    """Refuse a guidance network trained on another base model (their fingerprints differ);
    with ``force`` only warn. Models without a fingerprint (plain callables) are not checked."""
    base = record.get("base_model")
    fingerprint = getattr(model, "fingerprint", None)
    if not isinstance(base, dict) or fingerprint is None:
        return
    mine = fingerprint()
    if base.get("fingerprint") == mine:
        return
    message = (f"the guidance network in {path} was trained for {base.get('name')!r} (fingerprint "
               f"{base.get('fingerprint')}), not for {getattr(model, 'name', '?')!r} (fingerprint {mine})")
    if force:
        warnings.warn(message + "; loaded anyway (force=True): its estimate of the tilt may be wrong", stacklevel=3)
        return
    raise TiltgenError(message + "; train one for this model with `tiltgen train-guidance`, or pass force=True "
                                 "(--force-guidance) to use it anyway")


def prompt_encoder(model: Any, record: dict) -> CondEncoder | None:
    """How ``model`` embeds prompts for the network of ``record``: its ``prompt_embedding`` with
    the pooling the network was trained with; None for a network without a condition input."""
    if not int(record.get("net", {}).get("cond_dim", 0) or 0):
        return None
    embed = getattr(model, "prompt_embedding", None)
    pooling = (record.get("train") or {}).get("prompt_pooling", "padded")
    if embed is None or pooling == "padded":
        return embed
    return functools.partial(embed, pooling=pooling)


def from_pretrained(name_or_path: str | os.PathLike, model: Any = None, *, force: bool = False,
                    scale: float | None = None, cond_encoder: CondEncoder | None = None,
                    cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> LearnedGuidance:
    """Load a guidance network. ``model`` (the base model it will guide) is checked against the
    fingerprint the network was trained on, and a prompt-conditional network then embeds prompts
    with ``model.prompt_embedding`` unless ``cond_encoder`` is given. ``scale`` None: the
    calibrated scale in the record, else 1."""
    from .train import load_guidance

    folder = resolve_guidance_path(name_or_path, cache_dir=cache_dir, revision=revision)
    record = read_guidance_record(folder)
    if model is not None:
        check_base_model(record, model, folder, force)
        if cond_encoder is None:
            cond_encoder = prompt_encoder(model, record)
    return load_guidance(folder, cond_encoder=cond_encoder, scale=scale, record=record)


def save_pretrained(guidance: LearnedGuidance, folder: str | os.PathLike, record: dict | None = None) -> Path:
    """Write ``guidance`` (weights, its record with the tiltgen version, a model card) to ``folder``."""
    from .train import _write_tensors

    record = dict(record if record is not None else getattr(guidance, "record", None) or {})
    if "net" not in record or "schedule" not in record:
        raise TiltgenError("save_pretrained needs the network's training record (net, schedule, ...): a network "
                           "from train_guidance or from_pretrained carries it")
    record["tiltgen_version"] = record.get("tiltgen_version") or tiltgen_version()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in guidance.potential.net.state_dict().items()}
    _write_tensors(folder / WEIGHTS, weights)
    write_json(folder / CONFIG, record)
    write_model_card(folder, record)
    return folder


def _ess_cell(ess: dict | None) -> str:
    if not ess:
        return "not recorded"
    return f"min {ess['min']:.1f}, median {ess['median']:.1f} per condition (of {ess['samples_per_condition']})"


def _anneal_rows(anneal: dict | None) -> list[str]:
    if not anneal:
        return []
    ladder = ", ".join(f"{s['beta']:.4g}" for s in anneal["stages"])
    return [f"| annealed training | {len(anneal['stages'])} stage(s), β = {ladder}; each stage's weights kept ≥ "
            f"{anneal['ess_fraction']:g} of their samples effective (the base samples alone: "
            f"{anneal.get('base_weights_ess', float('nan')):.1f} at the target β) |"]


def write_model_card(folder: Path, record: dict) -> Path:
    path = Path(folder) / CARD
    text = model_card(record, name=Path(folder).name)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


def _quote(items: list[str], limit: int) -> str:
    shown = ", ".join(f"`{p.strip(chr(39))}`" for p in items[:limit])
    return shown + (f", ... ({len(items)} in all, listed in `{CONFIG}`)" if len(items) > limit else "")


def model_card(record: dict, name: str = "guidance") -> str:
    """A README.md for the network: what it guides, towards what, trained on what, and how to use it."""
    base = record.get("base_model") if isinstance(record.get("base_model"), dict) else {}
    base_name = base.get("name") or record.get("model") or "unknown"
    prompts = [str(p) for p in record.get("conditions") or []]
    held_out = [str(p) for p in record.get("held_out_conditions") or []]
    calibration = record.get("calibration") or {}
    train = record.get("train") or {}
    lines = ["---", "library_name: tiltgen", "tags:", "- tiltgen", "- reward-guidance", "- diffusion",
             f"base_model: {base_name}", "---", "", f"# {name}", "",
             f"A tiltgen guidance network: it steers **{base_name}** towards p*(x|c) ∝ p(x|c)·exp(r(x, c)/β) "
             f"for the reward **`{record.get('reward', '?')}`** at **β = {record.get('beta', '?')}**, at sampling "
             "time, without changing the model's weights.", "",
             "| | |", "|---|---|",
             f"| base model | `{base_name}` |",
             f"| base model fingerprint | `{base.get('fingerprint', 'none')}` (config and weights of its denoiser; "
             "loading onto another model is refused) |",
             f"| reward | `{record.get('reward', '?')}` |",
             f"| β | {record.get('beta', '?')} |",
             f"| objective | {record.get('loss', '?')} loss, {'noise tilt (one-step generator)' if train.get('noise_tilt') else 'x_t tilt'} |",
             f"| training prompts | {len(prompts) or 'none (unconditional)'} |",
             f"| training data | {record.get('data_size', '?')} samples of the base model, "
             f"{record.get('train_reward_evals', '?')} reward evaluations |",
             f"| effective samples of the tilt weights | {_ess_cell(record.get('weights_ess'))} |",
             f"| steps | {record.get('steps', '?')} (weights kept: step {record.get('best_step', '?')}) |",
             *_anneal_rows(record.get("anneal")),
             f"| held-out loss | {record.get('held_out_loss')} |",
             f"| calibrated scale | {calibration.get('scale', 1.0)} |",
             f"| tiltgen version | {record.get('tiltgen_version') or tiltgen_version()} |", ""]
    if prompts:
        lines += [f"Training prompts: {_quote(prompts, EXAMPLE_PROMPTS)}."]
        if held_out:
            lines += ["", f"Held out from training (validation): {len(held_out)} of them."]
        lines += [""]
    lines += ["## Use", "", "```python", "import tiltgen", "from tiltgen.tilt.learned import from_pretrained", "",
              "guidance = from_pretrained(FOLDER_OR_HUB_ID, model=model)  # model: the base model above",
              "```", "", "or from the command line:", "", "```bash",
              f"tiltgen sample --model {base_name} --method learned --guidance FOLDER_OR_HUB_ID --prompt '...'",
              "```", ""]
    return "\n".join(lines)
