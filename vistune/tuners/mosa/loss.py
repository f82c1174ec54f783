"""MoSA's consistency regulariser between two forwards with different random expert draws."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mosa_consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` of the softmaxes over the last dim, averaged
    over all other positions; gradients flow into both sides.

    In training each forward of a MoSA-tuned model draws new experts, so two forwards of the same batch give
    the two views (the official ``ADAPTER.ADDITIONAL`` recipe, weight 1.0)::

        logits_a, logits_b = model(images), model(images)
        loss = F.cross_entropy(logits_a, labels) + 1.0 * mosa_consistency_loss(logits_a, logits_b)
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    log_a = F.log_softmax(logits_a.float().flatten(0, -2), dim=-1)
    log_b = F.log_softmax(logits_b.float().flatten(0, -2), dim=-1)
    kl_ab = (log_a.exp() * (log_a - log_b)).sum(-1)
    kl_ba = (log_b.exp() * (log_b - log_a)).sum(-1)
    return 0.5 * (kl_ab + kl_ba).mean()
