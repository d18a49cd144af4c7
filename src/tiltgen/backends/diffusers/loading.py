"""Find and load a diffusers pipeline from a local folder or the Hugging Face cache (never the network).

A *local folder* is anything a pipeline's ``save_pretrained`` wrote: a ``model_index.json`` naming
the pipeline class and one sub-folder per component. ``builtin:<name>`` is such a folder shipped
with tiltgen (the built-in world's models). A *model id* (``org/name``) is resolved in the local
Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``cache_dir``) with
``local_files_only=True``; tiltgen never downloads weights itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...builtin import PREFIX, builtin_path
from ...errors import TiltgenError
from ...hub import cached_snapshot, hf_cache_dir, looks_like_model_id

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "FluxPipeline")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".gguf")
_NON_MODEL_COMPONENTS = ("tokenizer", "scheduler", "feature_extractor", "image_processor", "processor")


def resolve_model_path(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                       revision: str | None = None) -> Path:
    """Local folder of a diffusers pipeline: ``name_or_path`` itself, or its snapshot in the HF cache."""
    name = str(name_or_path)
    if name.startswith(PREFIX):
        path = builtin_path(name)
        if not (path / "model_index.json").is_file():
            raise TiltgenError(f"{name} is not a text-to-image model (it has no model_index.json); "
                               "`tiltgen models` lists the built-in models")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TiltgenError(f"model path {path} is a file; give the folder written by a diffusers pipeline's "
                               "save_pretrained (it contains model_index.json)")
        if not (path / "model_index.json").is_file():
            raise TiltgenError(f"{path} has no model_index.json: not a diffusers pipeline folder (single-file "
                               ".safetensors checkpoints are not supported; convert them with diffusers first)")
        return path
    if not looks_like_model_id(name):
        raise TiltgenError(f"model path {path} does not exist (a Hugging Face model id has the form 'org/name')")
    try:
        path = cached_snapshot(name, cache_dir=cache_dir, revision=revision)
    except LookupError as error:
        raise TiltgenError(f"model {name!r} is not in the local Hugging Face cache ({hf_cache_dir(cache_dir)}); "
                           f"tiltgen does not download weights: run `huggingface-cli download {name}` on a machine "
                           f"with network access (or set HF_HUB_CACHE / --cache-dir), or pass a local folder "
                           f"[{error}]") from None
    if not (path / "model_index.json").is_file():
        raise TiltgenError(f"model {name!r} in the Hugging Face cache ({path}) has no model_index.json: "
                           "it is not a diffusers pipeline (or its download is incomplete)")
    return path


def read_model_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TiltgenError(f"cannot read {path / 'model_index.json'}: {error}") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise TiltgenError(f"{path / 'model_index.json'} has no _class_name")
    return index


def check_components(path: Path, index: dict[str, Any]) -> None:
    """Every component the index names must have its folder, and every model its config and weights."""
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            missing.append(f"{name}/ (folder)")
            continue
        if name.startswith(_NON_MODEL_COMPONENTS):
            continue
        if not (folder / "config.json").is_file():
            missing.append(f"{name}/config.json")
        if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir()):
            missing.append(f"{name}/*.safetensors (weights)")
    if missing:
        raise TiltgenError(f"pipeline folder {path} is incomplete; missing component(s): {', '.join(missing)}")


def _dtype_keyword() -> str:
    """``dtype`` where diffusers accepts it (it deprecates ``torch_dtype`` with a warning on every
    load), else ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(name_or_path: str | os.PathLike, *, torch_dtype: Any = None, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None, variant: str | None = None) -> Any:
    """Load the diffusers pipeline named by ``model_index.json`` from a folder or the local HF cache."""
    path = resolve_model_path(name_or_path, cache_dir=cache_dir, revision=revision)
    index = read_model_index(path)
    class_name = index["_class_name"]
    if class_name not in SUPPORTED_PIPELINES:
        raise TiltgenError(f"{path}: pipeline class {class_name!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_PIPELINES)}")
    check_components(path, index)
    try:
        import diffusers
    except ImportError:
        raise TiltgenError("loading diffusers pipelines needs the optional dependencies: "
                           "pip install 'tiltgen[diffusers]'") from None
    cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs[_dtype_keyword()] = torch_dtype
    if variant is not None:
        kwargs["variant"] = variant
    # components the folder omits (e.g. SD3 saved without its T5 encoder) load as None
    import inspect

    for name, param in inspect.signature(cls.__init__).parameters.items():
        spec = index.get(name)
        absent = spec is None or (isinstance(spec, (list, tuple)) and spec and spec[0] is None)
        if name != "self" and absent and param.default in (inspect.Parameter.empty, None):
            kwargs[name] = None
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # per-component loading bars: noise before every run
    transformers_logging.disable_progress_bar()
    try:
        pipe = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise TiltgenError(f"cannot load {class_name} from {path}: {error}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
