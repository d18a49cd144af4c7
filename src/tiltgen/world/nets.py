"""The two reward networks of the shapes world (model code; recipes in tiltgen/builtin/recipes).

* :class:`AttributeClassifier` reads a 32x32 image the way the world is built: for each of the
  five position slots, whether a shape is there and its shape, colour and size; and the
  background. Prompt-fidelity rewards (``world-fidelity``, ``world-binary``) are built on it.
* :class:`ProxyPreference` is a learned stand-in for the gold preference, fitted by
  Bradley-Terry maximum likelihood to a limited set of noisy comparisons: like PickScore or
  ImageReward, it agrees with the gold on typical images and can be exploited off them.

A network folder holds ``config.json`` (kind, architecture, training record) and
``model.safetensors`` (float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TiltgenError
from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES

IMAGE_SIZE = 32
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLASSIFIER_KIND = "attribute-classifier"
PROXY_KIND = "proxy-preference"
#: Per-slot heads of the classifier, with their class names.
SLOT_HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES}


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # batch norm trains severalfold faster; in eval mode it is a fixed affine map
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]


def _coords(x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([x * 2 - 1, xs, ys], dim=1)


class AttributeClassifier(nn.Module):
    """CNN on [N, 3, 32, 32] images in [0, 1] -> logits: ``background`` [N, 4], ``occupied``
    [N, 5] and, per position slot, ``shape`` [N, 5, 5], ``colour`` [N, 5, 7], ``size`` [N, 5, 2].

    Coordinate input channels, two conv stages pooled 32 -> 16 -> 8, a third to 4x4, then a
    flattened map (slots are places, so no global pooling) and one hidden layer. SiLU keeps
    its input gradients smooth for guidance that differentiates through it.
    """

    def __init__(self, width: int = 32, hidden: int = 192):
        super().__init__()
        self.width, self.hidden = int(width), int(hidden)
        w = self.width
        self.features = nn.Sequential(
            *_conv_bn(5, w), *_conv_bn(w, w), nn.AvgPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.AvgPool2d(2),
            *_conv_bn(2 * w, 2 * w), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 8) ** 2, self.hidden), nn.SiLU())
        per_slot = sum(len(v) for v in SLOT_HEADS.values()) + 1
        self.heads = nn.Linear(self.hidden, len(BACKGROUND_NAMES) + len(POSITIONS) * per_slot)

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n = x.shape[0]
        out = self.heads(self.features(_coords(x)))
        background, slots = out.split([len(BACKGROUND_NAMES), out.shape[1] - len(BACKGROUND_NAMES)], dim=1)
        slots = slots.view(n, len(POSITIONS), -1)
        sizes = [1] + [len(v) for v in SLOT_HEADS.values()]
        occupied, *heads = slots.split(sizes, dim=2)
        return {"background": background, "occupied": occupied.squeeze(2), **dict(zip(SLOT_HEADS, heads))}


class ProxyPreference(nn.Module):
    """Scalar preference CNN on [N, 3, 32, 32] images in [0, 1] -> [N].

    A different design from the classifier (strided convs, no normalisation layers).
    ``forward`` returns ``scale * raw + shift``: the affine map, fitted after training and stored
    in the config, gives it the gold's mean and spread on world images, so one beta tilts both
    about equally hard.
    """

    def __init__(self, width: int = 24, hidden: int = 64, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.width, self.hidden = int(width), int(hidden)
        self.scale, self.shift = float(scale), float(shift)
        w = self.width
        self.body = nn.Sequential(
            nn.Conv2d(5, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 8) ** 2, self.hidden), nn.SiLU(), nn.Linear(self.hidden, 1))

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden}

    def raw(self, x: Tensor) -> Tensor:
        """Unnormalised Bradley-Terry score [N]."""
        return self.body(_coords(x)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.raw(x) * self.scale + self.shift


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_network(model: nn.Module, config: dict[str, Any], out: str | Path) -> Path:
    """Write ``model.safetensors`` (float32) and ``config.json`` into the folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"kind": str(config.get("kind", ""))})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_network(path: str | Path, kind: str) -> nn.Module:
    """The network of ``kind`` in the folder ``path`` (config.json + model.safetensors): eval
    mode, frozen, float32."""
    from safetensors.torch import load_file

    folder = Path(path)
    files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise TiltgenError(f"{kind} folder {folder} lacks {', '.join(missing)}")
    config = json.loads(files[0].read_text())
    if config.get("kind") != kind:
        raise TiltgenError(f"{folder} holds a {config.get('kind')!r} network, expected {kind!r}")
    arch = config["architecture"]
    if kind == CLASSIFIER_KIND:
        model: nn.Module = AttributeClassifier(**arch)
    else:
        norm = config["normalisation"]
        model = ProxyPreference(**arch, scale=norm["scale"], shift=norm["shift"])
    try:
        model.load_state_dict(load_file(str(files[1])))
    except RuntimeError as exc:
        raise TiltgenError(f"{files[1]} does not match the architecture in {files[0]}: {exc}") from None
    return model.eval().requires_grad_(False)
