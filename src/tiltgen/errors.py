"""User-facing errors.

Every problem caused by bad input raises :class:`TiltgenError` (a ``ValueError``) with a
message naming the offending argument, so the CLI can print it without a stack trace.
"""

from __future__ import annotations

import math
from typing import Iterable


class TiltgenError(ValueError):
    """Bad input or configuration, reported with a message a user can act on."""


def check_beta(beta: float) -> float:
    """Return ``beta`` as a float if it is a finite number > 0, else raise."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise TiltgenError(f"beta must be a number > 0, got {beta!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise TiltgenError(f"beta must be a finite number > 0 (the tilt temperature), got {beta!r}")
    return value


def check_choice(kind: str, name: str, choices: Iterable[str]) -> str:
    """Raise unless ``name`` is one of ``choices``; the message lists the valid ones."""
    options = sorted(choices)
    if name not in options:
        raise TiltgenError(f"unknown {kind} {name!r}; choose one of: {', '.join(options)}")
    return name
