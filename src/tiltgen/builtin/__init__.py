"""tiltgen's built-in text-to-image world: small models trained by this repository on the
procedural shapes world (:mod:`tiltgen.world`) and shipped with the package.

Every shipped artefact lives in ``weights/<name>/`` next to this file: a JSON config, a
safetensors file and a ``README.md`` with the exact command and seed that reproduce it.
``builtin:<name>`` anywhere a model or weights path is accepted resolves here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TiltgenError
from ..world import WorldConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
PREFIX = "builtin:"

# The world the built-in models, rewards and guidance networks are trained on: 16x16 pixels
# (the smallest the world allows; what 2 CPU cores can train in minutes) and one shape per
# image (two-shape compositions are beyond models this small).
IMAGE_SIZE = 16
BUILTIN_WORLD = WorldConfig(size=IMAGE_SIZE, max_shapes=1)


def available_builtins() -> list[str]:
    """Names of the shipped artefacts (folders of ``weights/`` that hold a config)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir() and any(p.glob("*.json")))


def builtin_path(name: str) -> Path:
    """The folder of the shipped artefact ``name`` (``builtin:`` prefix optional)."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    path = WEIGHTS_DIR / key
    if not key or "/" in key or not path.is_dir():
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


def is_builtin_model(name_or_path: str | Path) -> bool:
    """True for ``builtin:<name>`` and for folders holding a built-in model's ``tiltgen_model.json``."""
    text = str(name_or_path)
    return text.startswith(PREFIX) or (Path(text).expanduser() / "tiltgen_model.json").is_file()
