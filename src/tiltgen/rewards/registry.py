"""An explicit registry of named reward factories (no string introspection)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import check_choice
from ..core.reward import Reward

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: ``@register_reward("brightness")`` on a factory returning a Reward."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Build the registered reward ``name``; unknown names raise with the list of choices."""
    check_choice("reward", name, _REGISTRY)
    return _REGISTRY[name](**kwargs)
