"""The configuration of one fine-tuning run, and the checks that refuse bad settings early."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import TiltgenError, check_beta, check_choice

METHODS = ("rwdsm", "draft", "dpo")
#: keys of :class:`FinetuneConfig` that decide the base-sample pool (rwdsm, dpo); data is reused when they match
DATA_KEYS = ("samples_per_prompt", "data_steps", "cfg", "seed", "height", "width")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run of a pipeline's denoiser towards p* ∝ p · exp(r / beta).

    * ``rwdsm``: denoising score matching on ``samples_per_prompt`` base samples per prompt,
      each weighted by exp(r / beta) normalised within its prompt (the offline optimum of
      E[r] - beta KL is exactly p*).
    * ``draft``: back-propagate r / beta through the last ``draft_k`` sampler steps, minus
      ``reg`` times the squared distance to the frozen base model's output from the same state.
    * ``dpo``: Diffusion-DPO on pairs of base samples of one prompt, with soft Bradley–Terry
      labels sigma((r_a - r_b) / beta); ``dpo_scale`` converts the per-element loss difference
      into the implicit log-likelihood ratio (Diffusion-DPO's beta * T).
    """

    method: str
    beta: float
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    budgets: tuple[int, ...] = ()         # extra steps at which a pipeline folder is written
    checkpoint_every: int = 50
    lora_rank: int = 0                    # 0: full fine-tuning; > 0: LoRA through peft
    samples_per_prompt: int = 16          # rwdsm, dpo: base samples per prompt
    data_steps: int | None = None         # sampler steps of base samples and of draft (None: the model's default)
    cfg: float | None = None              # CFG scale of sampling (None: the model's default)
    draft_k: int = 1
    reg: float = 1.0
    dpo_scale: float = 1000.0
    t_min: float = 1e-3                   # rwdsm, dpo: training times ~ U(t_min, 1)
    height: int | None = None
    width: int | None = None
    grad_accum: int = 1                   # micro-batches per step (same step, less memory)
    mixed_precision: str = "no"           # no, bf16 or fp16: autocast of the loss's forward pass

    def __post_init__(self) -> None:
        check_choice("fine-tuning method", self.method, METHODS)
        check_beta(self.beta)
        for name in ("steps", "batch_size", "checkpoint_every", "samples_per_prompt", "draft_k", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TiltgenError(f"{name} must be an integer >= 1, got {value!r}")
        check_choice("mixed precision", self.mixed_precision, ("no", "bf16", "fp16"))
        if self.batch_size % self.grad_accum:
            raise TiltgenError(f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} "
                               "equal micro-batches")
        if self.method == "dpo" and self.samples_per_prompt < 2:
            raise TiltgenError("dpo needs at least 2 samples per prompt to form pairs")
        if self.lora_rank < 0:
            raise TiltgenError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not self.lr > 0:
            raise TiltgenError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.t_min < 1:
            raise TiltgenError(f"t_min must be in (0, 1), got {self.t_min}")
        if self.reg < 0 or self.dpo_scale <= 0:
            raise TiltgenError("reg must be >= 0 and dpo_scale > 0")
        bad = [b for b in self.budgets if not 1 <= b <= self.steps]
        if bad:
            raise TiltgenError(f"budgets must lie in 1..steps ({self.steps}), got {bad}")
        object.__setattr__(self, "budgets", tuple(sorted(set(int(b) for b in self.budgets))))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["budgets"] = list(self.budgets)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["budgets"] = tuple(values.get("budgets", ()))
        return cls(**values)


def differing_keys(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two JSON configs (either missing counts)."""
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
