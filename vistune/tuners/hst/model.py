"""HST tuner: a hierarchical side network fed by a frozen timm ViT, attached through hooks.

What the hooks do (see :class:`HSTTuner`): before every ViT block a learnable meta token is prepended
(``block_input`` point of the ViT site), after the block its output is read out and dropped and the block's
patch tokens are recorded (``block_output``); forward hooks on each block's ``norm1``/``norm2`` recompute the
LayerNorm with tuned affine parameters ``weight + dw``, ``bias + db`` (the deltas live in the tuner, so the
backbone's own tensors never change and detach restores it exactly); a forward hook on the model replaces the
ViT's logits by the side network's when the tuner has a classification head.

Activation checkpointing (timm's ``model.set_grad_checkpointing``, non-reentrant ``torch.utils.checkpoint``):
a checkpointed block runs its forward again in backward, so its hooks fire twice. The meta-token insertion and
the LayerNorm hooks are pure functions of their inputs and must run again (the recomputation has to reproduce
the forward); the readout records block outputs only while a forward is recording them: a pre-hook on
``patch_embed`` (outside the checkpointed blocks) starts a recording, the last block's readout ends it, so a
recomputation in backward returns the same tensor but never feeds the side network twice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ...core.errors import BackboneMismatchError, TunerError
from ...core.model import list_tuners
from ...core.tuner import Tuner
from ...sites.vit import ViTBlock, find_vit_blocks, vit_block_site
from .config import HSTConfig
from .layer import ClassifierHead, OverlapPatchEmbed, SideBlock, SideNorm, Stem, init_side_weights


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def check_image_size(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The ViT patch grid for ``images`` ``(B, C, H, W)``, or a ``ValueError`` saying how to fix the size.

    H and W must be multiples of the patch size, and equal the model's ``img_size`` unless it was built with
    ``dynamic_img_size=True``. Resize (e.g. ``torch.nn.functional.interpolate``) before calling; the HST
    pipeline does so itself.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected images as a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    patch_embed = model.patch_embed
    ph, pw = _pair(patch_embed.patch_size)
    height, width = images.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the ViT patch size {ph}x{pw}; resize to e.g. "
            f"{max(ph, round(height / ph) * ph)}x{max(pw, round(width / pw) * pw)}"
        )
    expected = _pair(getattr(patch_embed, "img_size", None) or (height, width))
    if getattr(patch_embed, "strict_img_size", True) and (height, width) != expected:
        raise ValueError(
            f"image size {height}x{width} differs from the ViT's img_size {expected[0]}x{expected[1]}; resize the "
            "images, or build the ViT with timm.create_model(..., dynamic_img_size=True)"
        )
    return height // ph, width // pw


class _TunerHook:
    """Base of the small hook objects (not closures): they survive deepcopy and are found again at uninstall."""

    def __init__(self, tuner: "HSTTuner", index: int = -1):
        self.tuner = tuner
        self.index = index


class _MetaInsert(_TunerHook):
    def __call__(self, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        return self.tuner.insert_meta(block, x)


class _Readout(_TunerHook):
    def __call__(self, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        return self.tuner.read_block(block, x)


class _NormHook(_TunerHook):
    def __init__(self, tuner: "HSTTuner", index: int, which: int):
        super().__init__(tuner, index)
        self.which = which

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return self.tuner.tuned_norm(module, self.index, self.which, args[0])


class _ForwardStart(_TunerHook):
    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.tuner.start_recording()


class _SizeCheck(_TunerHook):
    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.tuner.active and args:
            check_image_size(module, args[0])


class _Logits(_TunerHook):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        tuner = self.tuner
        if not tuner.active or tuner.head is None:
            return None
        return tuner.head(tuner.side_features(args[0])[-1])


class HSTTuner(Tuner):
    """Hierarchical Side-Tuning (Lin et al., arXiv 2310.05393), following the official ``ViT_HSN``.

    Parameters (all owned by the tuner): ``embeds`` (the conv stem and three overlap patch embeddings: strides
    4/8/16/32), ``stages`` (one :class:`SideBlock` per ViT layer, ``config.layers_per_stage`` per stage),
    ``stage_norms``, ``bridges`` (one ``Linear(vit_dim, stage width)`` per stage), ``head`` (when
    ``num_classes``), and with ``backbone_grad``: ``meta_tokens`` (one ``(1, 1, vit_dim)`` token per ViT block,
    xavier-uniform), ``meta_norms`` (a LayerNorm per block on the bridged meta token) and ``norm_weight`` /
    ``norm_bias`` (``(depth, 2, vit_dim)`` deltas of the blocks' ``norm1``/``norm2`` affine parameters, zero at
    init: tuning them equals tuning the LayerNorms as the paper does).

    Side block of ViT layer ``i`` in stage ``s``: the block's patch map is bridged to the stage width and resized
    bilinearly to the stage resolution (bridging first: a linear map commutes with bilinear resizing, and it is
    far cheaper than resizing ``vit_dim`` channels), then ``x += CrossAttn(norm(x), kv=[meta_i, mean(map)])``,
    ``x += map``, ``x += MLP(norm(x))``.

    With ``gradient_checkpointing`` (default) the tuner turns on timm's block checkpointing while attached, so
    training keeps only each block's input and recomputes the block in backward (same losses and gradients).

    Use: ``model(images)`` returns HST logits (with a head); :func:`hst_features` returns the 4 stage maps.
    """

    config_class = HSTConfig

    def __init__(self, config: HSTConfig, model: nn.Module):
        super().__init__(config)
        blocks = find_vit_blocks(model)
        depth, dim = len(blocks), blocks[0].dim
        self.num_prefix_tokens = blocks[0].num_prefix_tokens
        groups = config.layers_per_stage(depth)
        self.stage_of_layer = [s for s, n in enumerate(groups) for _ in range(n)]
        dims = config.stage_dims
        if config.backbone_grad:
            for i, block in enumerate(model.blocks):
                if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)
                        and block.norm1.weight is not None and block.norm2.weight is not None):
                    raise BackboneMismatchError(
                        f"blocks.{i} has no affine nn.LayerNorm norm1/norm2 for HST to tune; use backbone_grad=False"
                    )
        self.embeds = nn.ModuleList(
            [Stem(dims[0])] + [OverlapPatchEmbed(dims[s - 1], dims[s]) for s in range(1, len(dims))]
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(SideBlock(dims[s], config.stage_heads[s], config.mlp_ratio) for _ in range(n))
            for s, n in enumerate(groups)
        )
        self.stage_norms = nn.ModuleList(SideNorm(d) for d in dims)
        self.bridges = nn.ModuleList(nn.Linear(dim, d) for d in dims)
        self.bridges.apply(init_side_weights)
        if config.backbone_grad:
            self.meta_tokens = nn.ParameterList(nn.Parameter(torch.empty(1, 1, dim)) for _ in range(depth))
            for token in self.meta_tokens:
                nn.init.xavier_uniform_(token)
            self.meta_norms = nn.ModuleList(nn.LayerNorm(dims[s]) for s in self.stage_of_layer)
            self.norm_weight = nn.Parameter(torch.zeros(depth, 2, dim))
            self.norm_bias = nn.Parameter(torch.zeros(depth, 2, dim))
        self.head = ClassifierHead(dims[-1], config.num_classes) if config.num_classes else None
        self.layout = {"depth": depth, "embed_dim": dim, "num_prefix_tokens": self.num_prefix_tokens}
        self._metas: list[torch.Tensor] = []
        self._maps: list[torch.Tensor] = []
        self._recording = False
        self._grad_at_start = False
        self._previous_checkpointing: bool | None = None
        self._patch = _pair(model.patch_embed.patch_size)

    @property
    def active(self) -> bool:
        return self.scale != 0

    # -- hooks -----------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        self.train(model.training)
        checkpoint = self.config.backbone_grad and self.config.gradient_checkpointing
        if checkpoint and not callable(getattr(model, "set_grad_checkpointing", None)):
            raise BackboneMismatchError(
                f"{type(model).__name__} has no set_grad_checkpointing(); use HSTConfig(gradient_checkpointing=False)"
            )
        site = vit_block_site(model)
        points = ["block_output"] + (["block_input"] if self.config.backbone_grad else [])
        added = []
        try:
            for point in points:
                site.add_editor(model, point, self.name, _MetaInsert(self) if point == "block_input" else _Readout(self))
                added.append(point)
        except BaseException:
            for point in added:
                site.remove_editor(model, point, self.name)
            raise
        if self.config.backbone_grad:
            for i, block in enumerate(model.blocks):
                block.norm1.register_forward_hook(_NormHook(self, i, 0))
                block.norm2.register_forward_hook(_NormHook(self, i, 1))
        model.patch_embed.register_forward_pre_hook(_ForwardStart(self))
        model.register_forward_pre_hook(_SizeCheck(self))
        model.register_forward_hook(_Logits(self))
        if checkpoint:
            self._previous_checkpointing = bool(getattr(model, "grad_checkpointing", False))
            model.set_grad_checkpointing(True)

    def uninstall(self, model: nn.Module) -> None:
        site = vit_block_site(model)
        for point in ("block_input", "block_output"):
            site.remove_editor(model, point, self.name)
        for module in model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, _TunerHook) and h.tuner is self]:
                    del hooks[key]
        self._metas, self._maps, self._recording = [], [], False
        if self._previous_checkpointing is not None:
            model.set_grad_checkpointing(self._previous_checkpointing)
            self._previous_checkpointing = None

    def start_recording(self) -> None:
        """A ViT forward starts (``patch_embed`` pre-hook): record the block outputs it makes."""
        self._metas, self._maps = [], []
        self._recording = self.active
        self._grad_at_start = torch.is_grad_enabled()

    def insert_meta(self, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        """``block_input``: prepend this block's meta token (VPT-deep: a fresh token before every block)."""
        if not self.active:
            return None
        token = self.meta_tokens[block.index].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([token, x], dim=1)

    def read_block(self, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        """``block_output``: record the meta token's output and the patch tokens; drop the meta token.

        Records only during a forward's recording (not when a checkpointed block is recomputed in backward).
        """
        if not self.active:
            return None
        record = self._recording and len(self._maps) == block.index
        if record and self._grad_at_start and not torch.is_grad_enabled() and self.config.backbone_grad:
            self._recording = False
            raise TunerError(
                "gradients are off inside the ViT blocks of a forward with gradients on (reentrant activation "
                "checkpointing?); HST needs non-reentrant checkpointing: timm.layers.set_reentrant_ckpt(False)"
            )
        if record and block.index == self.layout["depth"] - 1:
            self._recording = False
        if self.config.backbone_grad:
            meta, x = x[:, :1], x[:, 1:]
            if record:
                self._metas.append(meta)
                self._maps.append(x[:, self.num_prefix_tokens:])
            return x
        if record:
            self._maps.append(x[:, self.num_prefix_tokens:].detach())
        return None

    def tuned_norm(self, norm: nn.LayerNorm, index: int, which: int, x: torch.Tensor) -> torch.Tensor | None:
        """``norm1``/``norm2`` of block ``index`` with tuned affine parameters (the backbone's stay untouched)."""
        if not self.active:
            return None
        weight = norm.weight + self.norm_weight[index, which].to(norm.weight.dtype)
        bias = norm.bias + self.norm_bias[index, which].to(norm.bias.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def backbone_parameters_to_train(self, backbone: nn.Module):
        return ()

    # -- the side network ------------------------------------------------------------------------------------
    def side_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The stage maps ``(B, stage_dims[s], H/2^(s+2), W/2^(s+2))`` from ``images`` and the activations the
        hooks recorded in the ViT forward that just ran on the same images."""
        depth = self.layout["depth"]
        if len(self._maps) != depth:
            raise TunerError(
                f"HST recorded {len(self._maps)} of {depth} ViT block outputs; run the ViT on the images first "
                "(model(images), or use vistune.tuners.hst.hst_features(model, images))"
            )
        maps, metas = self._maps, self._metas
        self._maps, self._metas = [], []
        dtype = self.bridges[0].weight.dtype
        batch, _, height, width = images.shape
        grid = (height // self._patch[0], width // self._patch[1])
        x = images.to(dtype)
        features = []
        layer = 0
        checkpoint = self.config.side_checkpointing and torch.is_grad_enabled()
        for s, (embed, blocks) in enumerate(zip(self.embeds, self.stages)):
            tokens, h, w = embed(x)
            for _ in blocks:
                inputs = (layer, tokens, maps[layer], metas[layer] if metas else None, grid, (h, w))
                if checkpoint:
                    tokens = torch.utils.checkpoint.checkpoint(self._side_layer, *inputs, use_reentrant=False)
                else:
                    tokens = self._side_layer(*inputs)
                layer += 1
            tokens = self.stage_norms[s](tokens)
            x = tokens.transpose(1, 2).reshape(batch, -1, h, w)
            features.append(x)
        return features

    def _side_layer(self, layer: int, tokens: torch.Tensor, vit_map: torch.Tensor, meta: torch.Tensor | None,
                    grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """One side block fed by ViT layer ``layer``: bridge, resize, ``kv = [meta, mean(map)]``, the block."""
        s = self.stage_of_layer[layer]
        bridge = self.bridges[s]
        dtype = bridge.weight.dtype
        batch = tokens.shape[0]
        vit = bridge(vit_map.to(dtype))  # (B, N, d_s)
        vit = vit.transpose(1, 2).reshape(batch, -1, *grid)
        vit = F.interpolate(vit, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        kv = vit.mean(dim=1, keepdim=True)
        if meta is not None:
            kv = torch.cat([self.meta_norms[layer](bridge(meta.to(dtype))), kv], dim=1)
        block = self.stages[s][layer - self.stage_of_layer.index(s)]
        return block(tokens, kv, vit)


def find_hst(model: nn.Module, name: str | None = None) -> HSTTuner:
    """The HST tuner attached to ``model`` (by ``name``, or the only one)."""
    tuners = {n: t for n, t in list_tuners(model).items() if isinstance(t, HSTTuner)}
    if name is not None:
        if name not in tuners:
            raise TunerError(f"no HST tuner named {name!r} is attached; HST tuners: {sorted(tuners) or 'none'}")
        return tuners[name]
    if len(tuners) != 1:
        raise TunerError(f"expected one attached HST tuner, found {sorted(tuners) or 'none'}; pass name=")
    return next(iter(tuners.values()))


def hst_features(model: nn.Module, images: torch.Tensor, name: str | None = None) -> list[torch.Tensor]:
    """Run the ViT on ``images`` and return HST's 4 stage maps (strides 4/8/16/32), e.g. for an FPN."""
    from ...core.model import unwrap

    model = unwrap(model)
    tuner = find_hst(model, name)
    if not tuner.active:
        raise TunerError("the HST tuner is off (scale 0); set_scale(model, 1) to get its features")
    check_image_size(model, images)
    model.forward_features(images)
    return tuner.side_features(images)
