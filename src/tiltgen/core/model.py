"""The model protocol: any callable ``(x_t, t, cond) -> prediction`` with a declared kind.

``t`` is a tensor of shape [N] in canonical time; ``cond`` is whatever the model takes as
conditioning (prompts, embeddings, or None). The prediction kind is one of
:data:`tiltgen.core.conversions.PREDICTIONS`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import TiltgenError, check_choice
from .conversions import PREDICTIONS, Coefficients, coefficients, to_x0_eps
from .schedules import Schedule


@runtime_checkable
class Model(Protocol):
    """A denoising/flow model in the canonical time convention."""

    prediction: str

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


class CallableModel:
    """Wrap a plain callable ``fn(x_t, t, cond)`` (or ``fn(x_t, t)``) as a :class:`Model`."""

    def __init__(self, fn: Callable[..., Tensor], prediction: str, takes_cond: bool = True):
        self.fn = fn
        self.prediction = check_choice("prediction kind", prediction, PREDICTIONS)
        self.takes_cond = takes_cond

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x_t, t, cond) if self.takes_cond else self.fn(x_t, t)


def as_model(fn: Callable[..., Tensor], prediction: str | None = None) -> Model:
    """Return ``fn`` as a :class:`Model`.

    ``prediction`` is required unless ``fn`` already declares ``fn.prediction``. A callable
    that takes only ``(x_t, t)`` is accepted too.
    """
    declared = getattr(fn, "prediction", None)
    if prediction is None and declared is None:
        raise TiltgenError("the model does not declare its prediction kind; pass prediction="
                           f"one of {', '.join(PREDICTIONS)}")
    if prediction is None or prediction == declared:
        check_choice("prediction kind", declared, PREDICTIONS)
        return fn  # type: ignore[return-value]
    if declared is not None:
        raise TiltgenError(f"model declares prediction {declared!r} but {prediction!r} was requested")
    import inspect

    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 3
    return CallableModel(fn, prediction, takes_cond=n_params != 2)


class Denoiser:
    """Evaluates a model and returns (x0_hat, eps_hat) — what every sampler step needs."""

    def __init__(self, model: Model, schedule: Schedule, cond: Any = None):
        self.model = as_model(model)
        self.schedule = schedule
        self.cond = cond

    def coefficients(self, x: Tensor, t: Tensor | float) -> Coefficients:
        return coefficients(self.schedule, t, x)

    def __call__(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        c = coefficients(self.schedule, t, x)
        t_vec = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        prediction = self.model(x, t_vec, self.cond)
        if prediction.shape != x.shape:
            raise TiltgenError(f"model returned shape {tuple(prediction.shape)} for input {tuple(x.shape)}")
        return to_x0_eps(self.model.prediction, prediction, x, c)


class CountingModel:
    """Counts model calls and per-sample evaluations (sum of batch sizes)."""

    def __init__(self, model: Model):
        self.model = as_model(model)
        self.prediction = self.model.prediction
        self.calls = 0
        self.sample_evals = 0

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self.calls += 1
        self.sample_evals += x_t.shape[0]
        return self.model(x_t, t, cond)
