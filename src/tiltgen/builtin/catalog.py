"""What is shipped: one row per built-in folder, for ``tiltgen models`` (reads files only, loads
no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import PREFIX, available_builtins, builtin_path, read_info

KIND_ORDER = {"generator": 0, "reward-network": 1, "guidance": 2}


def count_parameters(folder: Path) -> int:
    """Number of parameters in every safetensors file under ``folder`` (headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def describe(name: str) -> dict[str, Any]:
    """One built-in artefact: name, kind, family, pipeline class, folder, parameters, size,
    default steps and CFG (generators), rewards (reward networks), base model, reward, beta and
    the calibrated scale sampling uses (guidance networks)."""
    folder = builtin_path(name)
    info = read_info(folder)
    row: dict[str, Any] = {"name": PREFIX + folder.name, "kind": info.get("kind"), "family": info.get("family"),
                           "pipeline": info.get("pipeline"), "folder": str(folder),
                           "parameters": count_parameters(folder), "bytes": folder_bytes(folder)}
    if info.get("kind") == "generator":
        row.update(default_steps=info.get("default_steps"), default_cfg=info.get("default_cfg"))
    elif info.get("kind") == "reward-network":
        row.update(rewards=info.get("rewards"))
    elif info.get("kind") == "guidance":
        row.update(base_model=info.get("base_model"), reward=info.get("reward"), beta=info.get("beta"),
                   scale=_calibrated_scale(folder))
    return row


def _calibrated_scale(folder: Path) -> float:
    """The scale ``tiltgen calibrate-guidance`` recorded in the network's guidance.json, else 1."""
    path = folder / "guidance.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return float((record.get("calibration") or {}).get("scale", 1.0))


def catalog() -> list[dict[str, Any]]:
    """Every shipped artefact, generators first."""
    rows = [describe(n) for n in available_builtins()]
    return sorted(rows, key=lambda r: (KIND_ORDER.get(r["kind"], 9), r["name"]))
