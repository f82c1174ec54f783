"""Config of bottleneck adapters on timm ViT blocks (AdaptFormer, Pfeiffer, Houlsby)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ...core.config import TunerConfig, index_list_field, real_field
from ...core.errors import TunerError

STYLES = ("adaptformer", "pfeiffer", "houlsby")
ACTIVATIONS = ("gelu", "relu", "silu")
# per style: (adapter_scale, adapter_layernorm, activation), as in MoSA's MoSABlock / VPT's adapter block
_STYLE_DEFAULTS = {
    "adaptformer": (0.1, True, "gelu"),
    "pfeiffer": (1.0, False, "relu"),
    "houlsby": (1.0, False, "silu"),
}
# per style: which positions of a block hold an adapter ("attn": after attention, "mlp": at the MLP)
STYLE_KINDS = {"adaptformer": ("mlp",), "pfeiffer": ("mlp",), "houlsby": ("attn", "mlp")}


@dataclasses.dataclass
class AdapterConfig(TunerConfig):
    """Bottleneck adapters ``Up(act(Down(LN(x))))`` on the blocks of a timm ViT; identity at init (Up is zero).

    Args:
        style: where the adapter sits in each block (``h`` = post-attention residual, ``m`` = MLP branch,
            ``a`` = attention branch, ``s`` = ``adapter_scale``):
            ``"adaptformer"``: parallel to the MLP, ``out = h + m + s*A(h)`` (AdaptFormer / MoSA default);
            ``"pfeiffer"``: sequential after the MLP, ``out = h + m + s*A(m)``;
            ``"houlsby"``: after attention and after the MLP, ``a -> a + s*A1(a)`` and ``m -> m + s*A2(m)``.
        bottleneck: hidden width of each adapter (MoSA default 64, its VTAB recipe 16, NOAH's "Adapter" 8).
        target_blocks: indices of the blocks that get adapters; ``None`` = every block.
        adapter_scale: fixed output multiplier ``s``; default 0.1 for AdaptFormer, 1.0 otherwise.
        adapter_layernorm: LayerNorm on the adapter input; default True for AdaptFormer, False otherwise.
            Without it an 8-wide MLP adapter on ViT-B/16 has 12*(8*768*2+8+768) = 156,768 parameters.
        activation: ``"gelu"`` (exact), ``"relu"`` or ``"silu"``; default GELU / ReLU / SiLU by style.
        dropout: dropout on the hidden units in training (MoSA uses 0.1; 0 keeps training deterministic).
        scale: run-time strength multiplying every adapter (0 = exactly the base model).
    """

    tuner_type: ClassVar[str] = "adapter"
    style: str = "adaptformer"
    bottleneck: int = 64
    target_blocks: Optional[list[int]] = None
    adapter_scale: Optional[float] = None
    adapter_layernorm: Optional[bool] = None
    activation: Optional[str] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.style not in STYLES:
            raise TunerError(f"style must be one of {list(STYLES)}, got {self.style!r}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise TunerError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.target_blocks is not None:
            self.target_blocks = index_list_field("target_blocks", self.target_blocks)
        scale, layernorm, activation = _STYLE_DEFAULTS[self.style]
        self.adapter_scale = real_field("adapter_scale", scale if self.adapter_scale is None else self.adapter_scale)
        if self.adapter_layernorm is None:
            self.adapter_layernorm = layernorm
        if not isinstance(self.adapter_layernorm, bool):
            raise TunerError(f"adapter_layernorm must be true or false, got {self.adapter_layernorm!r}")
        self.activation = activation if self.activation is None else self.activation
        if self.activation not in ACTIVATIONS:
            raise TunerError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        self.dropout = real_field("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise TunerError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The adapter positions per block for this style: ``("mlp",)`` or ``("attn", "mlp")``."""
        return STYLE_KINDS[self.style]

    def adapter_fields(self) -> dict:
        """The fields an :class:`AdapterConfig` shares with this config (used to convert MoSA/Pear configs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)}
