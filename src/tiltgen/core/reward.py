"""The reward protocol: any callable ``(x0, cond) -> tensor[N]`` plus a differentiability flag.

Images are passed in [0, 1], NCHW; vector data as [N, d]. ``cond`` is the conditioning the
samples were generated with (prompts, or None).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import TiltgenError


@runtime_checkable
class Reward(Protocol):
    """A reward function r(x0, c) evaluated on a batch of N samples.

    A reward that knows its gradient in closed form may also define
    ``grad(x0, cond) -> tensor shaped like x0``; :func:`reward_gradient` then uses it
    instead of autograd (cheaper for simple rewards; an NN reward simply omits it).
    """

    differentiable: bool

    def __call__(self, x0: Tensor, cond: Any) -> Tensor: ...


class CallableReward:
    """Wrap a plain callable ``fn(x0, cond)`` or ``fn(x0)`` as a :class:`Reward`.

    ``differentiable`` None (undeclared) is taken as True and checked where a gradient is first
    taken: :func:`evaluate_reward` stops with a clear error if the output is not connected to
    the images by autograd."""

    def __init__(self, fn: Callable[..., Tensor], differentiable: bool | None, name: str | None = None,
                 takes_cond: bool = True):
        self.fn = fn
        self.declared = differentiable is not None
        self.differentiable = True if differentiable is None else bool(differentiable)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.takes_cond = takes_cond

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x0, cond) if self.takes_cond else self.fn(x0)


def as_reward(fn: Callable[..., Tensor], differentiable: bool | None = None, name: str | None = None) -> Reward:
    """Return ``fn`` as a :class:`Reward`. Differentiability: ``differentiable`` if given, else
    the callable's own ``differentiable`` attribute, else inferred (assumed, and checked by
    autograd the first time a gradient method uses it)."""
    if not callable(fn):
        raise TiltgenError(f"a reward must be callable as fn(x0, cond) -> tensor[N]; got a {type(fn).__name__}")
    declared = getattr(fn, "differentiable", None)
    if declared is not None and differentiable in (None, declared) and name in (None, getattr(fn, "name", None)):
        return fn  # type: ignore[return-value]
    import inspect

    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 2
    return CallableReward(fn, declared if differentiable is None else differentiable, name, takes_cond=n_params != 1)


def reward_name(reward: Reward) -> str:
    return str(getattr(reward, "name", type(reward).__name__))


def evaluate_reward(reward: Reward, x0: Tensor, cond: Any = None) -> Tensor:
    """Call ``reward`` and check its output: shape [N] and finite, else a clear error."""
    values = reward(x0, cond)
    if not isinstance(values, Tensor):
        raise TiltgenError(f"reward {reward_name(reward)!r} returned {type(values).__name__}, expected a tensor of shape [N]")
    if values.shape != (x0.shape[0],):
        raise TiltgenError(f"reward {reward_name(reward)!r} returned shape {tuple(values.shape)}, "
                           f"expected [{x0.shape[0]}] (one value per sample)")
    if getattr(reward, "differentiable", False) and x0.requires_grad and torch.is_grad_enabled() \
            and not values.requires_grad:
        how = "it was assumed differentiable (it declares nothing)" if getattr(reward, "declared", True) is False \
            else "it is declared differentiable"
        raise TiltgenError(f"reward {reward_name(reward)!r} gives no gradient with respect to the images: its output "
                           f"is not connected to them by autograd (numpy, PIL, .item(), .detach() ...), but {how}. "
                           "Gradient methods (tweedie, trainingfree, draft) cannot use it; declare it with "
                           "differentiable=False (an attribute, or the spec's differentiable=false) and use "
                           "learned guidance, best-of-n, smc, rwdsm or dpo, which need reward values only")
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:5].tolist()
        raise TiltgenError(f"reward {reward_name(reward)!r} returned non-finite values "
                           f"({int((~finite).sum())} of {len(values)}; e.g. samples {bad})")
    return values


def reward_gradient(reward: Reward, x0: Tensor, cond: Any = None) -> Tensor:
    """grad_x0 r(x0, c) [N, ...] at a detached x0: the reward's closed-form ``grad`` if it has
    one, else autograd through the reward only. Non-finite rewards or gradients raise."""
    closed_form = getattr(reward, "grad", None)
    if closed_form is not None:
        grad = closed_form(x0.detach(), cond)
        if grad.shape != x0.shape:
            raise TiltgenError(f"reward {reward_name(reward)!r} grad returned shape {tuple(grad.shape)}, "
                               f"expected {tuple(x0.shape)}")
    else:
        with torch.enable_grad():
            x = x0.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(evaluate_reward(reward, x, cond).sum(), x)
    if not bool(torch.isfinite(grad).all()):
        raise TiltgenError(f"reward {reward_name(reward)!r} has a non-finite gradient")
    return grad.detach()


class CountingReward:
    """Counts per-sample reward evaluations and those differentiated (input requires grad)."""

    def __init__(self, reward: Reward):
        self.reward = reward
        self.differentiable = reward.differentiable
        self.name = reward_name(reward)
        self.evals = 0
        self.grad_evals = 0

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        self.evals += x0.shape[0]
        if x0.requires_grad and torch.is_grad_enabled():
            self.grad_evals += x0.shape[0]
        return self.reward(x0, cond)

    @property
    def grad(self) -> Callable[[Tensor, Any], Tensor]:
        """The wrapped reward's closed-form gradient, counted as an evaluation and a gradient
        evaluation (AttributeError if it has none, so ``getattr(r, "grad", None)`` works)."""
        inner = getattr(self.reward, "grad", None)
        if inner is None:
            raise AttributeError("grad")

        def counted(x0: Tensor, cond: Any = None) -> Tensor:
            self.evals += x0.shape[0]
            self.grad_evals += x0.shape[0]
            return inner(x0, cond)

        return counted

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped reward's own attributes (e.g. closed-form parameters).
        if name == "reward" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.reward, name)
