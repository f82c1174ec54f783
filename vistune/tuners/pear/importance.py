"""First-order Taylor importance of each adapter: ``|sum_w (w * dL/dw)|`` accumulated over batches."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import TunerError
from ...core.model import get_tuner
from ..adapter.model import AdapterTuner, position_key

_ATTR = "_pear_importance"


def _adapter_tuner(model: nn.Module, name: str) -> AdapterTuner:
    tuner = get_tuner(model, name)
    if not isinstance(tuner, AdapterTuner):
        raise TunerError(f"tuner {name!r} is a {type(tuner).__name__}, not an adapter tuner; Pear needs adapters")
    return tuner


def accumulate_importance(model: nn.Module, name: str = "default") -> dict[str, float]:
    """Add this batch's importance of every stored adapter of tuner ``name`` to its running total.

    Call after ``loss.backward()`` and before ``optimizer.zero_grad()``. The importance of one adapter is the
    first-order Taylor estimate of the loss change when it is removed, ``|sum over its parameters of
    w * grad|``, computed per batch and summed over batches. Returns the running totals by position
    (``"mlp.3"``); a shared adapter (after pruning) is scored at its retained position.
    """
    tuner = _adapter_tuner(model, name)
    totals: dict[str, float] = vars(tuner).setdefault(_ATTR, {})
    batch: dict[str, float] = {}
    for kind, i in tuner.owned_positions():
        adapter = tuner.adapter_at(kind, i)
        grads = [(p, p.grad) for p in adapter.parameters() if p.grad is not None]
        if grads:
            with torch.no_grad():
                score = sum((p.detach().double() * g.double()).sum() for p, g in grads)
            batch[position_key(kind, i)] = abs(float(score))
    if not batch:
        raise TunerError(
            f"tuner {name!r} has no gradients: call accumulate_importance after loss.backward() and before "
            "optimizer.zero_grad()"
        )
    for key, value in batch.items():
        totals[key] = totals.get(key, 0.0) + value
    return dict(totals)


def importance_scores(model: nn.Module, name: str = "default") -> dict[str, float]:
    """The accumulated importance of each adapter position of tuner ``name`` (empty before any batch)."""
    return dict(vars(_adapter_tuner(model, name)).get(_ATTR, {}))


def reset_importance(model: nn.Module, name: str = "default") -> None:
    """Forget the accumulated importances of tuner ``name``."""
    vars(_adapter_tuner(model, name)).pop(_ATTR, None)
