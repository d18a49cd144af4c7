"""Weighted sums of rewards and the ``--reward`` spec syntax.

Spec: comma-separated terms ``name[(key=value;key=value)][:weight]``, e.g.
``'pickscore:1.0,aesthetic(head=/w/sac+logos+ava1-l14-linearMSE.pth):0.5'``. Values are parsed
as int, float, true/false, else kept as strings; the weight defaults to 1. ``name`` is a
registered reward, or a user's callable: ``my_module:function`` or ``path/to/file.py:function``
(see :mod:`tiltgen.rewards.user`), e.g. ``'my_rewards.py:sharpness(differentiable=false):0.5'``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import Tensor

from ..core.reward import Reward, as_reward, evaluate_reward, reward_name
from ..errors import TiltgenError
from .registry import get_reward
from .user import load_user_reward, split_user_target

# a term's target: path/file.py:function, module.path:function, or a registered name
_TERM = re.compile(r"^\s*([^\s():,]+?\.py:[A-Za-z_]\w*|[A-Za-z_][\w.]*:[A-Za-z_]\w*|[A-Za-z0-9_\-]+)"
                   r"\s*(?:\((.*)\))?\s*(?::\s*([-+0-9.eE]+))?\s*$")


class WeightedReward:
    """r(x, c) = sum_i w_i r_i(x, c); differentiable only if every term is.

    ``last_terms`` keeps the per-term values of the latest call (for logging held-out rewards).
    """

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        if not terms:
            raise TiltgenError("a weighted reward needs at least one term")
        self.terms = [(float(w), as_reward(r)) for w, r in terms]
        self.differentiable = all(r.differentiable for _, r in self.terms)
        self.declared = all(getattr(r, "declared", True) for _, r in self.terms)
        self.name = "+".join(f"{w:g}*{reward_name(r)}" for w, r in self.terms)
        self.last_terms: dict[str, Tensor] = {}

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        total = None
        self.last_terms = {}
        for w, r in self.terms:
            value = evaluate_reward(r, x0, cond).float()
            self.last_terms[reward_name(r)] = value.detach()
            total = w * value if total is None else total + w * value
        return total


def _value(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _split_terms(spec: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t for t in terms if t.strip()]


def parse_reward_spec(spec: str) -> tuple[list[tuple[str, dict[str, Any], float]], str]:
    """``spec`` -> [(name, kwargs, weight)] (and the spec back, normalised)."""
    parsed = []
    for term in _split_terms(spec):
        m = _TERM.match(term)
        if not m:
            raise TiltgenError(f"cannot parse reward term {term.strip()!r}; expected name[(key=value;...)][:weight], "
                               "e.g. 'pickscore:1.0,aesthetic(head=/path/head.pth):0.5'")
        name, args, weight = m.groups()
        kwargs = {}
        for item in filter(str.strip, (args or "").split(";")):
            if "=" not in item:
                raise TiltgenError(f"reward {name!r}: argument {item.strip()!r} must be key=value")
            key, value = item.split("=", 1)
            kwargs[key.strip()] = _value(value)
        parsed.append((name, kwargs, 1.0 if weight is None else float(weight)))
    if not parsed:
        raise TiltgenError("empty reward spec")
    return parsed, spec


def build_term(name: str, kwargs: dict[str, Any]) -> Reward:
    """One term of a spec: a user's callable (``module:function``, ``file.py:function``) or a
    registered reward built with ``kwargs``."""
    user = split_user_target(name)
    if user is not None:
        return load_user_reward(*user, kwargs)
    try:
        return get_reward(name, **kwargs)
    except TypeError as error:  # a misspelt or missing argument of the factory
        raise TiltgenError(f"reward {name!r}: {error}") from None


def reward_from_spec(spec: str) -> Reward:
    """Build a reward or a weighted sum of them from a spec string."""
    terms, _ = parse_reward_spec(spec)
    built = [(weight, build_term(name, kwargs)) for name, kwargs, weight in terms]
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedReward(built)


