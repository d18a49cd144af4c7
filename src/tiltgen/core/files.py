"""Atomic file writes: the content goes to a temporary file beside the target, then is renamed
into place, so a killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to ``.<name>.tmp`` beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON at ``path``, atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=indent)))


def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors of a safetensors file and its metadata ({} if none), in one read."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
