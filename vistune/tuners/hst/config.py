"""Config of Hierarchical Side-Tuning (HST, arXiv 2310.05393) on timm ViTs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ...core.config import TunerConfig, real_field
from ...core.errors import TunerError


def _positive_ints(name: str, value, length: int | None = None) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise TunerError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise TunerError(f"{name} must hold positive integers, got {value!r}")
    if length is not None and len(value) != length:
        raise TunerError(f"{name} must have {length} entries (one per stage), got {len(value)}")
    return [int(v) for v in value]


@dataclasses.dataclass
class HSTConfig(TunerConfig):
    """A hierarchical side network fed by a frozen timm ViT (defaults = the official ``ViT_HSN``).

    Args:
        stage_dims: widths of the side stages (strides 4, 8, 16, 32 of the image); official ``[32, 48, 64, 72]``.
        stage_heads: cross-attention heads per stage; official ``[2, 4, 8, 12]`` (each divides its width).
        stage_layers: how many ViT layers each stage consumes (one side block per ViT layer, in depth order);
            ``None`` = an even split of the ViT's depth (3/3/3/3 on ViT-B/16; earlier stages get one less when
            the depth does not divide).
        mlp_ratio: hidden width of each side block's MLP, as a multiple of its stage width.
        num_classes: size of the classification head (mean pool of stage 4 -> BatchNorm1d(affine=False) ->
            Linear); 0 = no head, the tuner only makes the feature pyramid. With a head, ``model(images)``
            returns HST's logits instead of the ViT's.
        backbone_grad: True (the paper): a meta token per ViT block and trainable ViT block LayerNorms, so
            backward runs through the ViT. False (beyond the paper, LST-style): no meta tokens, no LayerNorm
            tuning, the ViT activations are detached, so backward never enters the ViT (less memory and time).
        gradient_checkpointing: with ``backbone_grad``, turn on timm's activation checkpointing of the ViT blocks
            (``model.set_grad_checkpointing(True)``; detach restores the model's previous setting). Only the block
            inputs are kept in the forward; each block's forward runs again in backward, so the losses and
            gradients are those of the plain run, training memory drops by most of the ViT's activations and a
            training step costs one more ViT forward (ViT-B/16, batch 8, CPU: peak memory 0.67x -> 0.32x of full
            fine-tuning, step time 0.74x -> 1.05x of full, i.e. about +40%; benchmarks/results/vit.md). Turn it
            off for speed when memory is not tight. Outputs never change; no effect with ``backbone_grad=False``
            (backward never enters the ViT there). ``False`` leaves the model's setting
            as it is (calling ``model.set_grad_checkpointing(True)`` yourself works the same).
        side_checkpointing: checkpoint the side network's layers in training (``torch.utils.checkpoint``,
            non-reentrant): each side layer keeps only its inputs and runs again in backward. Same losses and
            gradients; a small saving (ViT-B/16, batch 8, CPU: 0.67x -> 0.59x of full fine-tuning alone, 0.32x ->
            0.29x with ``gradient_checkpointing``) for +5-10% step time, so off by default.
        scale: 0 turns HST off exactly (the ViT runs as before, with its own head); any other value runs it.
    """

    tuner_type: ClassVar[str] = "hst"
    stage_dims: list[int] = dataclasses.field(default_factory=lambda: [32, 48, 64, 72])
    stage_heads: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8, 12])
    stage_layers: Optional[list[int]] = None
    mlp_ratio: float = 4.0
    num_classes: int = 0
    backbone_grad: bool = True
    gradient_checkpointing: bool = True
    side_checkpointing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stage_dims = _positive_ints("stage_dims", self.stage_dims)
        stages = len(self.stage_dims)
        self.stage_heads = _positive_ints("stage_heads", self.stage_heads, stages)
        bad = [(d, h) for d, h in zip(self.stage_dims, self.stage_heads) if d % h]
        if bad:
            raise TunerError(f"each stage width must be divisible by its head count, got (width, heads) {bad}")
        if self.stage_layers is not None:
            self.stage_layers = _positive_ints("stage_layers", self.stage_layers, stages)
        self.mlp_ratio = real_field("mlp_ratio", self.mlp_ratio)
        if self.mlp_ratio <= 0:
            raise TunerError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise TunerError(f"num_classes must be a non-negative integer, got {self.num_classes!r}")
        if not isinstance(self.backbone_grad, bool):
            raise TunerError(f"backbone_grad must be true or false, got {self.backbone_grad!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TunerError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if not isinstance(self.side_checkpointing, bool):
            raise TunerError(f"side_checkpointing must be true or false, got {self.side_checkpointing!r}")

    @property
    def num_stages(self) -> int:
        return len(self.stage_dims)

    def layers_per_stage(self, depth: int) -> list[int]:
        """ViT layers consumed by each stage for a ViT of ``depth`` blocks (checked against the depth)."""
        if self.stage_layers is not None:
            if sum(self.stage_layers) != depth:
                raise TunerError(
                    f"stage_layers {self.stage_layers} sum to {sum(self.stage_layers)}, but the ViT has {depth} blocks"
                )
            return list(self.stage_layers)
        if depth < self.num_stages:
            raise TunerError(f"a ViT of depth {depth} cannot feed {self.num_stages} side stages (one layer each)")
        base, extra = divmod(depth, self.num_stages)
        return [base + (1 if s >= self.num_stages - extra else 0) for s in range(self.num_stages)]
