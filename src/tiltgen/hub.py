"""Offline access to the Hugging Face cache: look up what is already there, never download."""

from __future__ import annotations

import os
from pathlib import Path


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder that is searched (``HF_HUB_CACHE`` unless given)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def looks_like_model_id(name: str) -> bool:
    """True for 'org/name'; paths (./x, /x, ~/x, a/b/c) are not ids."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~", "\\"))


def cached_snapshot(name: str, *, cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> Path:
    """The snapshot folder of model id ``name`` in the local cache.

    Raises ``LookupError`` (message: the hub's exception type) when it is not cached; callers
    turn that into an error naming what they were loading.
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, HFValidationError, ...
        raise LookupError(type(error).__name__) from None
