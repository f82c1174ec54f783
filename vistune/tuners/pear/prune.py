"""Pear's prune-and-share step: drop the least important adapters, reuse retained ones in their place."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ...core.config import real_field
from ...core.errors import TunerError
from ...core.model import get_tuner, replace_tuner, unwrap
from ..adapter.model import AdapterTuner, position_key
from .config import PearConfig
from .importance import _ATTR
from .model import PearTuner


def _check_ratio(ratio: float) -> float:
    ratio = real_field("ratio", ratio)
    if not 0 < ratio < 1:
        raise TunerError(f"prune ratio must be in (0, 1) (the fraction of adapters to prune), got {ratio}")
    return ratio


def plan_sharing(scores: Mapping[str, float], indices: list[int], kind: str, ratio: float) -> dict[str, str]:
    """Which adapters of one kind to prune and which retained adapter replaces each.

    Prunes ``floor(ratio * n + 0.5)`` of the ``n`` adapters, least important first (ties: the deeper one).
    Each pruned position gets the retained adapter nearest in depth; among equally near ones the most
    important, then the shallower.
    """
    n = len(indices)
    count = math.floor(ratio * n + 0.5)
    if count < 1 or count > n - 1:
        raise TunerError(
            f"prune ratio {ratio} would prune {count} of the {n} {kind} adapters; choose a ratio that prunes "
            f"at least one and keeps at least one (between {0.5 / n:.3g} and {(n - 0.5) / n:.3g})"
        )
    score = {i: scores[position_key(kind, i)] for i in indices}
    order = sorted(indices, key=lambda i: (score[i], -i))
    pruned, retained = order[:count], sorted(order[count:])
    plan = {}
    for p in sorted(pruned):
        best = min(retained, key=lambda r: (abs(r - p), -score[r], r))
        plan[position_key(kind, p)] = position_key(kind, best)
    return plan


def prune_and_share(
    model: nn.Module,
    ratio: float,
    name: str = "default",
    *,
    importance: Mapping[str, float] | None = None,
    knowledge_checkpoint: bool = True,
) -> PearTuner:
    """Replace adapter tuner ``name`` by a :class:`PearTuner` that keeps the most important adapters.

    ``ratio`` in (0, 1) is the fraction of adapters pruned, per adapter kind. ``importance`` defaults to the
    scores accumulated by :func:`accumulate_importance`. Sharing rule: see :func:`plan_sharing`.

    Knowledge checkpoint (our rule; the paper's mechanism is not in reachable text): each retained adapter
    ``r`` that replaces pruned adapters ``P`` becomes the importance-weighted mean of their parameters,
    ``w_r <- (I_r w_r + sum_p I_p w_p) / (I_r + sum_p I_p)``, so what the pruned adapters learned is kept in
    proportion to how much it mattered. ``knowledge_checkpoint=False`` keeps ``w_r`` as it was.

    The new tuner keeps the name, scale, train/eval mode and trainability. On any error nothing changes.
    """
    model = unwrap(model)
    tuner = get_tuner(model, name)
    if type(tuner) is not AdapterTuner:
        hint = " (merge it with merge_mosa first)" if tuner.config.tuner_type == "mosa" else ""
        raise TunerError(
            f"prune_and_share needs a plain adapter tuner; {name!r} is a {type(tuner).__name__}{hint}"
        )
    ratio = _check_ratio(ratio)
    scores = dict(vars(tuner).get(_ATTR, {}) if importance is None else importance)
    positions = [position_key(k, i) for k, i in tuner.positions()]
    missing = [p for p in positions if p not in scores]
    if missing:
        raise TunerError(
            f"no importance score for adapter positions {missing}: call accumulate_importance(model, {name!r}) "
            "after each backward, or pass importance={...}"
        )
    if any(not math.isfinite(float(scores[p])) or float(scores[p]) < 0 for p in positions):
        raise TunerError("importance scores must be finite and non-negative")
    shared: dict[str, str] = {}
    for kind in tuner.config.kinds:
        shared.update(plan_sharing(scores, list(tuner.targets), kind, ratio))

    config = PearConfig(
        **tuner.config.adapter_fields(),
        shared=shared,
        prune_ratio=ratio,
        knowledge_checkpoint=bool(knowledge_checkpoint),
    )
    pear = PearTuner(config, model)
    reference = next(tuner.parameters())
    pear.to(device=reference.device, dtype=reference.dtype)
    pear.load_state_dict(_retained_state(tuner, pear, scores, knowledge_checkpoint), strict=True)
    vars(pear)[_ATTR] = {p: float(scores[p]) for p in pear.sharing()}
    return replace_tuner(model, name, pear)


def _retained_state(
    tuner: AdapterTuner, pear: PearTuner, scores: Mapping[str, float], knowledge_checkpoint: bool
) -> dict[str, torch.Tensor]:
    old = {k: v.detach() for k, v in tuner.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for retained, users in pear.sharing().items():
        prefix = retained + "."
        for key in [k for k in old if k.startswith(prefix)]:
            suffix = key[len(prefix) :]
            weights = [float(scores[u]) for u in users] if knowledge_checkpoint else [1.0]
            total = sum(weights)
            if not knowledge_checkpoint or len(users) == 1 or total == 0:
                state[key] = old[key].clone()
                continue
            merged = sum(w * old[f"{u}.{suffix}"].double() for w, u in zip(weights, users)) / total
            state[key] = merged.to(old[key].dtype)
    return state
