"""Config of a Pear-pruned adapter: the adapter's fields plus the map of pruned -> shared positions."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional

from ...core.config import real_field
from ...core.errors import TunerError
from ..adapter.config import AdapterConfig

_POSITION = re.compile(r"^(attn|mlp)\.(\d+)$")


def parse_position(key: str) -> tuple[str, int]:
    """``"mlp.3"`` -> ``("mlp", 3)``; a :class:`TunerError` for anything else."""
    match = _POSITION.match(key) if isinstance(key, str) else None
    if match is None:
        raise TunerError(f"adapter position must look like 'mlp.3' or 'attn.0', got {key!r}")
    return match.group(1), int(match.group(2))


@dataclasses.dataclass
class PearConfig(AdapterConfig):
    """Pear (Prune and Share, arXiv 2409.19733): an adapter (all :class:`AdapterConfig` fields) in which the
    positions named in ``shared`` hold no adapter of their own but reuse a retained one.

    Built by :func:`~vistune.tuners.pear.prune_and_share`, not usually by hand.

    Args:
        shared: pruned position -> retained position whose adapter it reuses, e.g. ``{"mlp.2": "mlp.1"}``.
            Only the retained adapters are stored, so checkpoints shrink with the prune ratio.
        prune_ratio: the ratio the adapters were pruned with (a record; not used to rebuild).
        knowledge_checkpoint: whether pruned adapters were merged into their replacements (a record).
    """

    tuner_type: ClassVar[str] = "pear"
    shared: dict[str, str] = dataclasses.field(default_factory=dict)
    prune_ratio: Optional[float] = None
    knowledge_checkpoint: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.shared, dict):
            raise TunerError(f"shared must map pruned positions to retained ones, got {self.shared!r}")
        for pruned, retained in self.shared.items():
            (kind_p, _), (kind_r, _) = parse_position(pruned), parse_position(retained)
            if kind_p not in self.kinds:
                raise TunerError(f"shared names {pruned!r} but style {self.style!r} has only {list(self.kinds)}")
            if kind_p != kind_r:
                raise TunerError(f"shared maps {pruned!r} to {retained!r}: an adapter is shared within one kind")
            if retained in self.shared:
                raise TunerError(f"shared maps {pruned!r} to {retained!r}, which is itself pruned")
        self.shared = dict(sorted(self.shared.items(), key=lambda kv: parse_position(kv[0])))
        if self.prune_ratio is not None:
            self.prune_ratio = real_field("prune_ratio", self.prune_ratio)
        if not isinstance(self.knowledge_checkpoint, bool):
            raise TunerError(f"knowledge_checkpoint must be true or false, got {self.knowledge_checkpoint!r}")
