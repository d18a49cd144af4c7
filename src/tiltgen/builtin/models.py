"""The built-in text-to-image models as canonical tiltgen models (pixel space, no VAE).

A built-in model folder (``weights/<name>/`` or any path written by ``save_model``) holds::

    tiltgen_model.json   kind, schedule, prediction kind, CFG scale, default steps/sampler, world
    unet/                diffusers ``UNet2DConditionModel.save_pretrained`` (config.json + safetensors)
    text_encoder/        transformers ``CLIPTextModel.save_pretrained`` over the world's vocabulary
    README.md            what it is and the command + seed that reproduce it

The state is the image itself scaled to [-1, 1]: ``x0 = 2 * image - 1``. The UNet takes the
native timestep ``1000 t`` (canonical t; t = 0 data, t = 1 noise) — the one conversion at this
backend's boundary — and returns the declared prediction kind (``v`` for the VP diffusion
model and the distilled one-step generator, ``velocity`` for the rectified flow). Text is
tokenised with :func:`tiltgen.world.tokenize` (one id per word, no BPE); the text encoder's
hidden states feed the UNet's cross-attention and its pooled state (the first padding position,
which a causal encoder lets see the whole caption) its class-embedding projection.
Classifier-free guidance is part of the model call, as in the diffusers backend.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..backends.prompts import prompt_condition
from ..core.model import Model
from ..core.noise import SeededNoise, seeds_for
from ..core.samplers import initial_noise, sample as core_sample, time_grid
from ..core.schedules import Schedule, schedule_from_config
from ..errors import TiltgenError
from ..world import MAX_TOKENS, PAD_ID, VOCAB, tokenize_batch
from . import resolve_weights

MODEL_FILE = "tiltgen_model.json"
KIND = "tiltgen-builtin-text-to-image"
TIMESTEP_SCALE = 1000.0


@dataclass
class TextCondition:
    """Per-sample text conditioning: prompts (for rewards) and the encoder's outputs (for the UNet)."""

    prompts: list[str]
    hidden: Tensor          # [N, L, D] text encoder states (cross-attention)
    pooled: Tensor          # [N, D] pooled state (class embedding; guidance networks' prompt embedding)
    cfg_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int] | Tensor) -> "TextCondition":
        """The condition of a subset / resampling of the samples (used by particle methods)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return replace(self, prompts=[self.prompts[i] for i in idx.tolist()], hidden=self.hidden[idx],
                       pooled=self.pooled[idx])


def unet_config(image_size: int, width: int = 32, text_dim: int = 64) -> dict:
    """The UNet2DConditionModel config of the built-in models: three resolutions (16, 8, 4 for
    16x16 images) of plain ResNet blocks; text enters through cross-attention in the mid block
    and the pooled embedding added to the time embedding (every ResNet block sees it)."""
    return dict(sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(width, 2 * width, 2 * width),
                down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, cross_attention_dim=text_dim,
                attention_head_dim=8, norm_num_groups=8, class_embed_type="projection",
                projection_class_embeddings_input_dim=text_dim)


def text_encoder_config(text_dim: int = 64) -> dict:
    """A two-layer CLIP text transformer over the world's words; the pooled output is taken at
    the first padding id (``eos_token_id = PAD_ID``)."""
    return dict(vocab_size=len(VOCAB), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=PAD_ID,
                bos_token_id=PAD_ID, eos_token_id=PAD_ID)


def build_networks(image_size: int, width: int = 32, text_dim: int = 64) -> tuple[Any, Any]:
    """Fresh (UNet2DConditionModel, CLIPTextModel) for training."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (UNet2DConditionModel(**unet_config(image_size, width, text_dim)),
            CLIPTextModel(CLIPTextConfig(**text_encoder_config(text_dim))))


def encode_text(text_encoder: Any, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids [N, L] -> (hidden states [N, L, D], pooled [N, D]).

    No attention mask: the encoder is causal and padding is on the right, so words never see
    padding, and masking would leave the all-padding (unconditional) caption nothing to attend to."""
    out = text_encoder(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def unet_output(unet: Any, x: Tensor, t: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
    """The UNet at canonical time t [N] (native timestep 1000 t)."""
    return unet(x, t * TIMESTEP_SCALE, encoder_hidden_states=hidden, class_labels=pooled, return_dict=False)[0]


class BuiltinModel:
    """A built-in text-to-image model: a canonical :class:`~tiltgen.core.model.Model` on
    [-1, 1] images [N, 3, S, S], conditioned on prompts or a :class:`TextCondition`."""

    def __init__(self, unet: Any, text_encoder: Any, config: dict, name: str = "builtin"):
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.config = dict(config)
        self.name = name
        self.schedule: Schedule = schedule_from_config(config["schedule"])
        self.prediction = str(config["prediction"])
        self.family = str(config["family"])
        self.image_size = int(config["image_size"])
        self.latent_shape = (3, self.image_size, self.image_size)
        self.cfg_scale = float(config.get("cfg_scale", 1.0))
        self.default_steps = int(config.get("default_steps", 50))
        self.default_sampler = str(config.get("default_sampler", "ddim"))
        self._cache: dict[str, TextCondition] = {}
        self._empty: tuple[Tensor, Tensor] | None = None  # the unconditional (all-padding) caption

    def __repr__(self) -> str:
        return (f"BuiltinModel({self.name}: {self.family}, {self.image_size}x{self.image_size}, {self.prediction}, "
                f"{self.schedule!r}, cfg {self.cfg_scale:g})")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---- text -------------------------------------------------------------------------------
    def _ids(self, prompts: Sequence[str]) -> Tensor:
        return tokenize_batch(list(prompts)).to(self.device)

    def encode(self, prompts: Sequence[str] | str, guidance_scale: float | None = None) -> TextCondition:
        """Encode prompts (each a caption of the world's grammar; unknown words raise)."""
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        if not prompts:
            raise TiltgenError("need at least one prompt")
        with torch.no_grad():
            hidden, pooled = encode_text(self.text_encoder, self._ids(prompts))
        scale = self.cfg_scale if guidance_scale is None else float(guidance_scale)
        return TextCondition(prompts, hidden, pooled, scale)

    def _unconditional(self, n: int) -> tuple[Tensor, Tensor]:
        if self._empty is None:
            ids = torch.full((1, MAX_TOKENS), PAD_ID, dtype=torch.long, device=self.device)
            with torch.no_grad():
                self._empty = encode_text(self.text_encoder, ids)
        hidden, pooled = self._empty
        return hidden.expand(n, -1, -1), pooled.expand(n, -1)

    def condition(self, cond: Any, n: int) -> TextCondition:
        """``cond`` as a TextCondition of N rows (plain prompts are encoded and cached; one row
        is broadcast), so generic library code can pass a prompt string."""
        return prompt_condition(cond, n, encode=self.encode, cache=self._cache, kind=TextCondition,
                                what="a built-in model", unit="images")

    def prompt_embedding(self, cond: Any) -> Tensor:
        """The pooled text embedding per sample [N, D] (float32): guidance networks' prompt input."""
        n = len(cond) if isinstance(cond, (TextCondition, list, tuple)) else 1
        return self.condition(cond, n).pooled.detach().float()

    # ---- the model call ---------------------------------------------------------------------------
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        cond = self.condition(cond, x_t.shape[0])
        t = t.to(x_t.dtype).expand(x_t.shape[0])
        dtype = next(self.unet.parameters()).dtype
        x = x_t.to(dtype)
        if cond.cfg_scale == 1.0:
            return unet_output(self.unet, x, t.to(dtype), cond.hidden.to(dtype), cond.pooled.to(dtype)).to(x_t.dtype)
        hidden_u, pooled_u = self._unconditional(x.shape[0])
        both = unet_output(self.unet, torch.cat([x, x]), torch.cat([t, t]).to(dtype),
                           torch.cat([cond.hidden, hidden_u]).to(dtype), torch.cat([cond.pooled, pooled_u]).to(dtype))
        pred_c, pred_u = both.chunk(2)
        return (pred_u + cond.cfg_scale * (pred_c - pred_u)).to(x_t.dtype)

    def evals_per_call(self, cond: TextCondition | None = None) -> int:
        """Network evaluations per sample per model call (2 with classifier-free guidance)."""
        scale = self.cfg_scale if cond is None else cond.cfg_scale
        return 1 if scale == 1.0 else 2

    # ---- images ---------------------------------------------------------------------------------
    @staticmethod
    def decode(x: Tensor) -> Tensor:
        """States [-1, 1] -> images in [0, 1] (clamped, as saved; differentiable inside the range)."""
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def encode_images(images: Tensor) -> Tensor:
        """Images in [0, 1] -> states in [-1, 1]."""
        return images * 2 - 1

    def latent_reward(self, reward: Any) -> Any:
        """``reward`` (on images in [0, 1] and prompts) as a reward on states: decode, then score."""
        from ..backends.diffusers.backend import LatentReward

        return LatentReward(reward, self)

    def times(self, steps: int | None = None) -> Tensor:
        """The sampling grid (float64, decreasing to 0): uniform in t from the schedule's t_max."""
        return time_grid(self.schedule, steps or self.default_steps)

    def initial_noise(self, seeds: Sequence[int], t_start: float) -> Tensor:
        noise = SeededNoise(list(seeds), self.latent_shape, device=self.device)
        return initial_noise(self.schedule, noise, t_start)

    def sample(self, cond: TextCondition, *, seeds: Sequence[int] | None = None, seed: int = 0,
               steps: int | None = None, sampler: str | None = None, guidance: Any = None,
               model: Model | None = None, callback: Callable | None = None, progress: bool = False) -> "Samples":
        """Sample images for ``cond`` (one per row); ``guidance`` is an estimator wrapped by
        GuidedModel, or pass any ``model`` built on this one (e.g. a NoiseTiltedModel)."""
        seeds = list(seeds) if seeds is not None else seeds_for(len(cond), seed)
        if len(seeds) != len(cond):
            raise TiltgenError(f"{len(seeds)} seeds for {len(cond)} prompts")
        grid = self.times(steps)
        if model is None:
            model = self
            if guidance is not None:
                from ..tilt.base import GuidedModel

                model = GuidedModel(self, self.schedule, guidance)
        x_init = self.initial_noise(seeds, float(grid[0]))
        with torch.no_grad():
            states = core_sample(model, self.schedule, cond=cond, x_init=x_init, seeds=seeds,
                                 sampler=sampler or self.default_sampler, times=grid, callback=callback,
                                 progress=progress, device=x_init.device)
        return Samples(states=states, images=self.decode(states), times=grid)


@dataclass
class Samples:
    states: Tensor   # [N, 3, S, S] in [-1, 1] (unclamped)
    images: Tensor   # [N, 3, S, S] in [0, 1]
    times: Tensor    # the sampling grid


def model_config(family: str, schedule: Schedule, prediction: str, image_size: int, *, cfg_scale: float,
                 default_steps: int, default_sampler: str, **extra: Any) -> dict:
    """The ``tiltgen_model.json`` contents."""
    return {"kind": KIND, "family": family, "schedule": schedule.config(), "prediction": prediction,
            "image_size": image_size, "cfg_scale": cfg_scale, "default_steps": default_steps,
            "default_sampler": default_sampler, "vocab": list(VOCAB), "timestep_scale": TIMESTEP_SCALE, **extra}


def save_model(out: str | Path, unet: Any, text_encoder: Any, config: dict, half: bool = True) -> Path:
    """Write a model folder (weights as float16 safetensors by default: half the size, and the
    models are evaluated in float32 after loading)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    for module, sub in ((unet, "unet"), (text_encoder, "text_encoder")):
        copy.deepcopy(module).to(dtype).save_pretrained(str(out / sub), safe_serialization=True)
    (out / MODEL_FILE).write_text(json.dumps(config, indent=2))
    return out


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> BuiltinModel:
    """Load ``builtin:<name>`` or a model folder (see the module docstring)."""
    path = resolve_weights(name_or_path, "model")
    config_file = path / MODEL_FILE
    if not config_file.is_file():
        raise TiltgenError(f"{path} is not a built-in model folder (no {MODEL_FILE})")
    config = json.loads(config_file.read_text())
    if config.get("kind") != KIND:
        raise TiltgenError(f"{config_file} has kind {config.get('kind')!r}, expected {KIND!r}")
    if config.get("vocab") != list(VOCAB):
        raise TiltgenError(f"{path} was trained with a different world vocabulary than this tiltgen version's")
    for sub in ("unet", "text_encoder"):
        if not (path / sub / "config.json").is_file():
            raise TiltgenError(f"{path} is missing {sub}/config.json")
    try:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise TiltgenError(f"the built-in models need diffusers and transformers ({error.name} is missing): "
                           "pip install -c constraints.txt 'tiltgen[diffusers]'") from None

    hf_logging.disable_progress_bar()  # a per-load bar of tensors read, noise for models this small
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=dtype).to(device)
    text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"), dtype=dtype).to(device)
    name = str(name_or_path) if str(name_or_path).startswith("builtin:") else path.name
    return BuiltinModel(unet, text_encoder, config, name=name)
