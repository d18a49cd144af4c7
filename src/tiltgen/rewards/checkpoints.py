"""Reading reward checkpoints and converting published layouts to transformers' module names.

* open_clip CLIP (HPSv2 / HPSv2.1 checkpoints) <-> transformers ``CLIPModel``
* BLIP (ImageReward.pt: ``blip.visual_encoder`` timm ViT + ``blip.text_encoder`` BERT + ``mlp``)
  <-> transformers ``BlipVisionModel`` / ``BlipTextModel`` + the MLP head

Every converter is a pure function on state dicts with an inverse, tested as a round trip.
:func:`load_strict` loads a converted dict and names missing / unexpected keys in a
:class:`~tiltgen.errors.TiltgenError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import TiltgenError

StateDict = dict[str, Tensor]
# buffers some checkpoints carry and some modules do not: never a reason to fail
_IGNORABLE = (re.compile(r"(^|\.)position_ids$"), re.compile(r"(^|\.)attn_mask$"))


def read_state_dict(path: str | Path) -> StateDict:
    """A checkpoint file (.safetensors, .pt/.pth/.bin) as a flat state dict on CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TiltgenError(f"reward checkpoint {path} does not exist" if not path.exists()
                           else f"reward checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise TiltgenError(f"cannot read reward checkpoint {path}: {error}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TiltgenError(f"reward checkpoint {path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _drop_ignorable(keys: Iterable[str]) -> list[str]:
    return sorted(k for k in keys if not any(p.search(k) for p in _IGNORABLE))


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(module: nn.Module, state: StateDict, what: str) -> None:
    """``module.load_state_dict(state)``; missing / unexpected / mis-shaped keys raise TiltgenError."""
    own = module.state_dict()
    missing = _drop_ignorable(set(own) - set(state))
    unexpected = _drop_ignorable(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        raise TiltgenError(f"{what}: checkpoint does not match the model ({'; '.join(parts)}); "
                           "is it the right checkpoint for this reward and config?")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise TiltgenError(f"{what}: checkpoint shapes do not match the config: {_listing(bad, 4)}")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ---------------------------------------------------------------------------------- open_clip
_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}


def _oc_tower(state: StateDict, src: str, dst: str, out: StateDict) -> set[str]:
    used = set()
    pattern = re.compile(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        m = pattern.match(key)
        if not m:
            continue
        layer, name, kind = m.groups()
        base = f"{dst}encoder.layers.{layer}."
        if name == "attn" and key.endswith(("in_proj_weight", "in_proj_bias")):
            continue
        if name not in _OC_LAYER:
            continue
        out[f"{base}{_OC_LAYER[name]}.{kind}"] = value
        used.add(key)
    pattern = re.compile(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            layer, kind = m.groups()
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{dst}encoder.layers.{layer}.self_attn.{proj}.{kind}"] = chunk.clone()
            used.add(key)
    return used


def open_clip_to_hf(state: StateDict) -> StateDict:
    """open_clip CLIP (``visual.*``, ``transformer.*``, ``token_embedding`` ...) -> ``CLIPModel`` keys.

    Unknown keys are kept under their own names, so :func:`load_strict` reports them.
    """
    out: StateDict = {}
    used = _oc_tower(state, "visual.", "vision_model.", out) | _oc_tower(state, "", "text_model.", out)
    direct = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for src, dst in direct.items():
        if src in state:
            out[dst] = state[src]
            used.add(src)
    for src, dst in (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight")):
        if src in state:  # open_clip multiplies x @ proj; nn.Linear stores proj^T
            out[dst] = state[src].t().contiguous()
            used.add(src)
    for key, value in state.items():
        if key not in used:
            out[key] = value
    return out


def hf_to_open_clip(state: StateDict) -> StateDict:
    """Inverse of :func:`open_clip_to_hf` (used by the round-trip tests)."""
    out: StateDict = {}
    inverse_layer = {v: k for k, v in _OC_LAYER.items()}
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    direct = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    pattern = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif (m := pattern.match(key)):
            tower, layer, name, kind = m.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{layer}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind, ""), {})[name[-6]] = value
            else:
                out[prefix + inverse_layer[name] + "." + kind] = value
        else:
            out[key] = value
    for (prefix, kind, _), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---------------------------------------------------------------------------------- BLIP (ImageReward)
_BLIP_VISION = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.embeddings.patch_embedding.\1"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"^blip\.visual_encoder\.norm\.(weight|bias)$", r"vision.post_layernorm.\1"),
    (r"^blip\.text_encoder\.(.+)$", r"text.\1"),
    (r"^mlp\.layers\.(\d+)\.(weight|bias)$", r"head.layers.\1.\2"),
]
# parts of the BLIP pre-training model that ImageReward's score does not use
BLIP_UNUSED = (r"^blip\.(vision_proj|text_proj|itm_head|temp|image_queue|text_queue|idx_queue|ptr_queue)",
               r"^blip\.visual_encoder_m\.", r"^blip\.text_encoder_m\.", r"^blip\.(vision|text)_proj_m\.")


def image_reward_to_hf(state: StateDict) -> StateDict:
    """ImageReward.pt keys -> ``vision.*`` (BlipVisionModel), ``text.*`` (BlipTextModel), ``head.*`` (MLP).

    Parts the score never uses (contrastive projections, momentum encoders, queues) are dropped;
    anything else unknown is kept under its own name so :func:`load_strict` reports it.
    """
    unused = [re.compile(p) for p in BLIP_UNUSED]
    kept = {k: v for k, v in state.items() if not any(p.search(k) for p in unused)}
    return _rename_by_rules(kept, _BLIP_VISION)


def _rename_by_rules(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Rename each key by the first (regex, replacement) rule that matches; keep the others."""
    compiled = [(re.compile(a), b) for a, b in rules]
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            out[key] = value
    return out


def hf_to_image_reward(state: StateDict) -> StateDict:
    """Inverse of :func:`image_reward_to_hf` on the kept keys."""
    inverse = [
        (r"^vision\.embeddings\.class_embedding$", "blip.visual_encoder.cls_token"),
        (r"^vision\.embeddings\.position_embedding$", "blip.visual_encoder.pos_embed"),
        (r"^vision\.embeddings\.patch_embedding\.(weight|bias)$", r"blip.visual_encoder.patch_embed.proj.\1"),
        (r"^vision\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"blip.visual_encoder.blocks.\1.norm1.\2"),
        (r"^vision\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"blip.visual_encoder.blocks.\1.norm2.\2"),
        (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$", r"blip.visual_encoder.blocks.\1.attn.qkv.\2"),
        (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$",
         r"blip.visual_encoder.blocks.\1.attn.proj.\2"),
        (r"^vision\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blip.visual_encoder.blocks.\1.mlp.\2.\3"),
        (r"^vision\.post_layernorm\.(weight|bias)$", r"blip.visual_encoder.norm.\1"),
        (r"^text\.(.+)$", r"blip.text_encoder.\1"),
        (r"^head\.layers\.(\d+)\.(weight|bias)$", r"mlp.layers.\1.\2"),
    ]
    return _rename_by_rules(state, inverse)
