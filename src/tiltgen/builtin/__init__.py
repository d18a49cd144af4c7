"""tiltgen's built-in artefacts: small models trained by this repository on the shapes world
and shipped with the package, and the recipes that train them.

Every shipped artefact is a folder in ``weights/<name>/``: the base models are complete
diffusers pipeline folders (``model_index.json`` + components), the reward and guidance
networks a config and a safetensors file. Each folder has a ``README.md`` with the command and
seed that reproduce it and a ``tiltgen.json`` describing it (kind, family, defaults), which
``tiltgen models`` lists. ``builtin:<name>`` anywhere a model, reward weights or guidance path
is accepted resolves here.

This package only locates folders (it imports nothing of tiltgen's layers), so any layer may
use it; the training recipes in ``recipes/`` sit beside the weights and import the layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TiltgenError

WEIGHTS_DIR = Path(__file__).parent / "weights"
PREFIX = "builtin:"
INFO_FILE = "tiltgen.json"


def available_builtins() -> list[str]:
    """Names of the shipped artefacts (folders of ``weights/`` with a ``tiltgen.json``)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / INFO_FILE).is_file())


def builtin_path(name: str) -> Path:
    """The folder of the shipped artefact ``name`` (``builtin:`` prefix optional)."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    path = WEIGHTS_DIR / key
    if not key or "/" in key or not (path / INFO_FILE).is_file():
        choices = ", ".join(PREFIX + n for n in available_builtins()) or "(none shipped)"
        raise TiltgenError(f"unknown built-in {name!r}; choose one of: {choices}")
    return path


def resolve_weights(name_or_path: str | Path, what: str) -> Path:
    """``builtin:<name>`` -> the shipped folder; anything else must be an existing path."""
    text = str(name_or_path)
    if text.startswith(PREFIX):
        return builtin_path(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise TiltgenError(f"{what} path {path} does not exist (use builtin:<name> for shipped weights: "
                           f"{', '.join(available_builtins()) or 'none'})")
    return path


def read_info(folder: str | Path) -> dict[str, Any]:
    """The ``tiltgen.json`` of a folder, or {} if it has none (e.g. a real checkpoint)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TiltgenError(f"cannot read {path}: {error}") from None
