"""Prompt conditions shared by the text-to-image backends (diffusers pipelines, built-in models)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TiltgenError


def prompt_condition(cond: Any, n: int, *, encode: Callable[[Any], Any], cache: dict[str, Any], kind: type,
                     what: str, unit: str) -> Any:
    """``cond`` as a condition of ``kind`` with N rows, so generic library code can pass prompts.

    A prompt string or a list of strings is encoded by ``encode`` once (kept in ``cache``); a
    one-row condition is broadcast to N rows (``kind.select``); any other row count raises.
    """
    if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and all(isinstance(p, str) for p in cond)):
        key = cond if isinstance(cond, str) else "\x00".join(cond)
        if key not in cache:
            cache[key] = encode([cond] if isinstance(cond, str) else list(cond))
        cond = cache[key]
    if not isinstance(cond, kind):
        raise TiltgenError(f"{what} needs prompts or the {kind.__name__} from .encode(prompts) as cond")
    if len(cond) == 1 and n > 1:
        cond = cond.select([0] * n)
    if len(cond) != n:
        raise TiltgenError(f"{n} {unit} but {len(cond)} prompts in the condition")
    return cond
