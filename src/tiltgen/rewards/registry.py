"""An explicit registry of named reward factories (no string introspection).

Rewards defined in tiltgen's own layers register here when their module is imported. Rewards
of higher layers and of other packages (the built-in world's ``world-*`` rewards, a user's
plugin) are found through the ``tiltgen.rewards`` entry-point group: each entry names a module
whose import registers its rewards. The group is loaded the first time a name is not found or
the registry is listed, so this layer never imports the world.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable

from ..errors import TiltgenError, check_choice
from ..core.reward import Reward

ENTRY_POINT_GROUP = "tiltgen.rewards"
_REGISTRY: dict[str, Callable[..., Reward]] = {}
_plugins_loaded = False


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: ``@register_reward("brightness")`` on a factory returning a Reward."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def load_plugins() -> None:
    """Import every module of the ``tiltgen.rewards`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except ImportError as error:
            raise TiltgenError(f"reward plugin {entry.name!r} ({entry.value}) cannot be imported: {error}") from None


def available_rewards() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Build the registered reward ``name``; unknown names raise with the list of choices."""
    if name not in _REGISTRY:
        load_plugins()
    check_choice("reward", name, _REGISTRY)
    return _REGISTRY[name](**kwargs)
