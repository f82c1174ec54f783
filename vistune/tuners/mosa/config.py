"""Config of MoSA: a bottleneck adapter split into sparse experts that merge back into one adapter."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ...core.errors import TunerError
from ..adapter.config import AdapterConfig

SPLIT_MODES = ("all", "row", "column")
MERGE_MODES = ("add", "joint")


def _int_field(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TunerError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass
class MoSAConfig(AdapterConfig):
    """MoSA (Mixture of Sparse Adapters, arXiv 2312.02923): an adapter (all :class:`AdapterConfig` fields) whose
    projection matrices are split element-wise into disjoint random masks, one per expert.

    Every expert starts as a copy of the same initialised projection. A training forward picks one random
    expert per block for Down and one for Up (a generator owned by the tuner, seeded with ``seed``); that
    expert's gradient reaches only its masked entries, so its other entries stay at their initial values with
    any optimizer (also AdamW's weight decay, which the official code lets shrink them). Eval mode uses the
    merged projection, so eval outputs equal those of :func:`~vistune.tuners.mosa.merge_mosa`'s plain adapter.

    Args:
        num_experts: experts per split projection (official default 4).
        share: ``None`` splits Down and Up; ``"down"`` keeps one dense shared Down and splits only Up (the
            released VTAB recipe: bottleneck 16, 4 experts, share "down").
        merge_mode: ``"add"``: the mean of the experts (official default); ``"joint"``: each expert's masked
            entries copied into one matrix. Biases are not split (as the official ``ADAPTER.BIAS=True``): each
            expert has its own bias and both modes merge biases by their mean.
        split_mode: ``"all"``: random equal shares of the whole matrix; ``"row"``/``"column"``: per row/column.
        seed: seeds the masks (per position, independent of torch's global RNG) and the expert draws.
        hierarchical: depth-dependent expert counts, rising linearly from ``min_experts`` at the first targeted
            block to ``num_experts`` at the last (shallow blocks denser, deep blocks sparser). This is our
            reconstruction of the paper's "hierarchical sparse strategy", whose exact definition is not in the
            released code or reachable text.
        min_experts: the expert count of the first block when ``hierarchical``.
    """

    tuner_type: ClassVar[str] = "mosa"
    num_experts: int = 4
    share: Optional[str] = None
    merge_mode: str = "add"
    split_mode: str = "all"
    seed: int = 0
    hierarchical: bool = False
    min_experts: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.num_experts = _int_field("num_experts", self.num_experts, 1)
        self.min_experts = _int_field("min_experts", self.min_experts, 1)
        self.seed = _int_field("seed", self.seed, 0)
        if self.share not in (None, "down"):
            raise TunerError(f"share must be null or 'down', got {self.share!r}")
        if self.merge_mode not in MERGE_MODES:
            raise TunerError(f"merge_mode must be one of {list(MERGE_MODES)}, got {self.merge_mode!r}")
        if self.split_mode not in SPLIT_MODES:
            raise TunerError(f"split_mode must be one of {list(SPLIT_MODES)}, got {self.split_mode!r}")
        if not isinstance(self.hierarchical, bool):
            raise TunerError(f"hierarchical must be true or false, got {self.hierarchical!r}")
        if self.hierarchical and self.min_experts > self.num_experts:
            raise TunerError(f"min_experts ({self.min_experts}) exceeds num_experts ({self.num_experts})")

    def expert_counts(self, num_targets: int) -> list[int]:
        """Experts per targeted block, in depth order (all ``num_experts`` unless ``hierarchical``)."""
        if not self.hierarchical or num_targets == 1:
            return [self.num_experts] * num_targets
        span = self.num_experts - self.min_experts
        return [self.min_experts + round(span * k / (num_targets - 1)) for k in range(num_targets)]

    def adapter_config(self) -> AdapterConfig:
        """The plain :class:`AdapterConfig` the merged experts form."""
        return AdapterConfig(**self.adapter_fields())
