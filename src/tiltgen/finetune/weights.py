"""The trainable denoiser of a pipeline (full weights or LoRA through ``peft``), its frozen
reference, and writing the result as a pipeline folder that plain diffusers loads."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..errors import TiltgenError

#: attention projections of diffusers UNets and SD3/FLUX transformers (as the diffusers LoRA scripts use)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TrainableDenoiser:
    """Makes ``backend.denoiser`` trainable in place: every weight (``lora_rank`` 0) or LoRA
    adapters of rank ``lora_rank`` on the attention projections (the base weights stay frozen).

    :meth:`reference` is a context in which the backend computes the frozen base model.
    """

    def __init__(self, backend: Any, lora_rank: int = 0):
        self.backend = backend
        self.lora_rank = int(lora_rank)
        base = backend.denoiser
        if self.lora_rank > 0:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise TiltgenError("LoRA fine-tuning needs peft: pip install 'tiltgen[finetune]'") from None
            config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS))
            self.module = get_peft_model(base, config)
            self._frozen = None
        else:
            self._frozen = copy.deepcopy(base).requires_grad_(False).eval()
            self.module = base.requires_grad_(True)
        backend.denoiser = self.module

    def parameters(self) -> list[Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base denoiser inside the block (no gradient)."""
        with torch.no_grad():
            if self.lora_rank > 0:
                with self.module.disable_adapter():
                    yield
            else:
                self.backend.denoiser = self._frozen
                try:
                    yield
                finally:
                    self.backend.denoiser = self.module

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must keep: the trainable tensors only."""
        if self.lora_rank > 0:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.module).items()}
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        if self.lora_rank > 0:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.module, tensors)
        else:
            self.module.load_state_dict(tensors)

    def merged(self) -> torch.nn.Module:
        """A plain diffusers model with the current weights (LoRA merged into a copy)."""
        if self.lora_rank > 0:
            return copy.deepcopy(self.module).merge_and_unload()
        return self.module


def denoiser_folder(backend: Any) -> str:
    return "unet" if backend.family in ("sd", "sdxl") else "transformer"


def _link_or_copy(src: Path, dst: Path) -> None:
    real = Path(os.path.realpath(src))  # the HF cache keeps files as symlinks into blobs/
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def write_pipeline(base: Path, out: Path, backend: Any, trainable: TrainableDenoiser, record: dict[str, Any]) -> Path:
    """``out``: the base pipeline folder with its denoiser replaced by the trained one.

    Other components are hard-linked (or copied) from ``base``; ``tiltgen.json`` keeps the
    base's sampling defaults and adds ``finetune`` (method, steps, base model). The components
    are assembled beside ``out`` and moved in one by one; files of the run (``finetune.json``,
    checkpoints) that live in ``out`` are left alone.
    """
    sub = denoiser_folder(backend)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index = json.loads((base / "model_index.json").read_text())
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    _link_or_copy(base / "model_index.json", tmp / "model_index.json")
    for name in components:  # only the pipeline: a fine-tuned base's own run files stay behind
        if name == sub or not (base / name).is_dir():
            continue
        for src in (base / name).rglob("*"):
            dst = tmp / src.relative_to(base)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
    trainable.merged().save_pretrained(str(tmp / sub), safe_serialization=True)
    info_path = base / "tiltgen.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.pop("name", None)
    info["finetune"] = record
    (tmp / "tiltgen.json").write_text(json.dumps(info, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir()):  # swap entry by entry: run files already in ``out`` stay
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    return out
