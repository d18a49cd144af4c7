"""A user's own reward named in a ``--reward`` spec: ``module.path:function`` or
``path/to/file.py:function``.

Without arguments the function itself is the reward, called as ``fn(x0, cond)`` (or ``fn(x0)``)
on images in [0, 1]. With arguments, ``module:make(key=value;...)``, the function is a factory
called with them that returns the reward. Whether the reward is differentiable comes from its
``differentiable`` attribute, else from the term's own ``differentiable=true|false`` argument,
else it is inferred: gradient methods try autograd through it and stop with a clear error if
its output does not depend on the images (see :func:`tiltgen.core.reward.as_reward`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.reward import Reward, as_reward
from ..errors import TiltgenError
from .registry import available_rewards

# module.path:function or some/file.py:function; the function part is an identifier, so a
# registered name with a numeric weight ("brightness:0.5") never matches
USER_TARGET = re.compile(r"^(?P<target>[^\s():,]+?\.py|[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)$")


def split_user_target(text: str) -> tuple[str, str] | None:
    """(module or file, function) when ``text`` names a user's callable, else None."""
    m = USER_TARGET.match(text.strip())
    return (m.group("target"), m.group("function")) if m else None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TiltgenError(f"reward file {path} does not exist")
    # a stable name per file, so that pickling and repeated loads see one module
    name = "tiltgen_user_reward_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TiltgenError(f"reward file {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's code: report it, do not bury it in a tiltgen trace
        del sys.modules[name]
        raise TiltgenError(f"importing reward file {path} failed: {type(error).__name__}: {error}") from error
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise TiltgenError(f"reward module {name!r} cannot be found ({error}); is it installed or on PYTHONPATH? "
                           "A file is named by its path: path/to/rewards.py:function") from None
    except Exception as error:
        raise TiltgenError(f"importing reward module {name!r} failed: {type(error).__name__}: {error}") from error


def load_user_reward(target: str, function: str, kwargs: dict[str, Any] | None = None) -> Reward:
    """The reward ``function`` of ``target`` (a module path or a .py file), built with ``kwargs``
    when given (a factory); ``kwargs['differentiable']`` declares differentiability."""
    kwargs = dict(kwargs or {})
    declared = kwargs.pop("differentiable", None)
    if declared is not None and not isinstance(declared, bool):
        raise TiltgenError(f"reward {target}:{function}: differentiable must be true or false, got {declared!r}")
    if not target.endswith(".py") and target in available_rewards():
        raise TiltgenError(f"cannot parse reward term '{target}:{function}': {target} is a registered reward, so what "
                           "follows ':' must be its weight, a number")
    module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    fn = getattr(module, function, None)
    if fn is None:
        raise TiltgenError(f"{target} has no function {function!r}")
    if not callable(fn):
        raise TiltgenError(f"{target}:{function} is a {type(fn).__name__}, not a callable reward")
    if kwargs:
        try:
            fn = fn(**kwargs)
        except TypeError as error:
            raise TiltgenError(f"reward factory {target}:{function}: {error}") from None
        if not callable(fn):
            raise TiltgenError(f"reward factory {target}:{function} returned a {type(fn).__name__}, not a callable")
    name = getattr(fn, "name", None) or f"{Path(target).stem if target.endswith('.py') else target}:{function}"
    return as_reward(fn, differentiable=declared, name=name)
