"""Blocks of timm Vision Transformers: where they are, and one shared set of hooks that edits them.

A timm ``Block`` computes ``h = x + drop_path1(ls1(attn(norm1(x))))`` then
``out = h + drop_path2(ls2(mlp(norm2(h))))``. Tuners reach five points of it, all through hooks on the block
or its submodules, so the backbone's code and weights stay untouched:

``block_input``   forward pre-hook on the block: ``x -> editor(x)`` (token insertion, e.g. HST meta tokens)
``attn_branch``   forward hook on ``ls1``: ``a -> a + sum delta(a)`` with ``a = ls1(attn(norm1(x)))``, before
                  drop-path and the residual (Houlsby's first adapter)
``mlp_branch``    forward hook on ``ls2``: ``m -> m + sum delta(m)`` with ``m = ls2(mlp(norm2(h)))``
                  (Pfeiffer, Houlsby's second adapter)
``parallel_mlp``  forward pre-hook on ``norm2`` reads the post-attention residual ``h`` exactly; the deltas
                  computed from it are added to the block output: ``out = h + mlp-branch + sum delta(h)``
                  (AdaptFormer)
``block_output``  forward hook on the block: ``out -> editor(out)``, after the ``parallel_mlp`` deltas

Several tuners may edit the same point. Deltas are computed from the original tensor and summed; transforms
(``block_input``/``block_output``) are chained; both in the order of the editors' keys (tuner names), so the
result does not depend on attach order. Hooks exist only for points that have editors, and the site object
lives on the model (a private attribute) only while it has editors, so a model without tuners runs stock code
and a ``deepcopy`` of a tuned model carries its own site and hooks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import BackboneMismatchError


@dataclasses.dataclass(frozen=True)
class ViTBlock:
    """One transformer block of a timm ViT.

    ``index`` is its position in ``model.blocks``; ``dim`` the token width; ``num_prefix_tokens`` how many
    class/distillation/register tokens precede the patch tokens; ``grid_size`` the patch grid (rows, cols) at
    the model's configured image size.
    """

    index: int
    dim: int
    num_heads: int
    num_prefix_tokens: int
    grid_size: tuple[int, int]

    @property
    def path(self) -> str:
        return f"blocks.{self.index}"


#: ``editor(block, tensor)`` returns a delta to add (or a replacement, for transform points) or ``None``.
BlockEditor = Callable[[ViTBlock, torch.Tensor], "torch.Tensor | None"]

DELTA_POINTS = ("attn_branch", "mlp_branch", "parallel_mlp")
TRANSFORM_POINTS = ("block_input", "block_output")
POINTS = ("block_input", "attn_branch", "parallel_mlp", "mlp_branch", "block_output")

_REQUIRED = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")


def _block_class() -> type[nn.Module]:
    from timm.models.vision_transformer import Block

    return Block


def _not_a_vit(model: nn.Module, why: str) -> BackboneMismatchError:
    return BackboneMismatchError(
        f"{type(model).__name__} is not a timm Vision Transformer ({why}); expected a model with "
        "patch_embed, num_prefix_tokens and blocks of timm's pre-norm Block (norm1, attn with fused qkv, ls1, "
        "norm2, mlp, ls2), e.g. timm.create_model('vit_base_patch16_224')"
    )


def find_vit_blocks(model: nn.Module) -> list[ViTBlock]:
    """Every block of a timm ViT, in depth order.

    Reads the module tree only (no forward pass), so it works on a model built on the ``meta`` device.
    Raises :class:`BackboneMismatchError` for anything else (a ResNet, a plain module, a post-norm block).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise _not_a_vit(model, "no 'blocks' sequence")
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if patch_embed is None or grid is None or len(tuple(grid)) != 2:
        raise _not_a_vit(model, "no patch_embed with a 2-D grid_size")
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int) or prefix < 0:
        raise _not_a_vit(model, "no integer num_prefix_tokens")
    block_class = _block_class()
    found: list[ViTBlock] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, block_class) or any(not hasattr(block, a) for a in _REQUIRED):
            raise _not_a_vit(model, f"blocks.{i} is a {type(block).__name__}, not timm's pre-norm Block")
        qkv = getattr(block.attn, "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
            raise _not_a_vit(model, f"blocks.{i}.attn has no fused qkv Linear(dim, 3*dim)")
        found.append(
            ViTBlock(
                index=i,
                dim=qkv.in_features,
                num_heads=int(getattr(block.attn, "num_heads", 1)),
                num_prefix_tokens=prefix,
                grid_size=(int(grid[0]), int(grid[1])),
            )
        )
    return found


def vit_patch_maps(
    tokens: torch.Tensor,
    model: nn.Module | None = None,
    *,
    num_prefix_tokens: int | None = None,
    grid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Patch tokens ``(B, prefix + H*W, C)`` of a block as an NCHW map ``(B, C, H, W)`` (prefix tokens dropped).

    The prefix count and grid come from ``model`` unless given; when the token count does not fit the
    model's grid (another image size with ``dynamic_img_size``), a square grid is inferred.
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(tokens.shape)}")
    if model is not None:
        info = find_vit_blocks(model)[0]
        num_prefix_tokens = info.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        grid_size = info.grid_size if grid_size is None else grid_size
    num_prefix_tokens = num_prefix_tokens or 0
    patches = tokens[:, num_prefix_tokens:]
    count = patches.shape[1]
    if grid_size is None or grid_size[0] * grid_size[1] != count:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(
                f"{count} patch tokens do not form the grid {grid_size} or a square grid; pass grid_size"
            )
        grid_size = (side, side)
    batch, _, channels = patches.shape
    return patches.reshape(batch, grid_size[0], grid_size[1], channels).permute(0, 3, 1, 2).contiguous()


_SITE_ATTR = "_vistune_vit_block_site"

# hook kind -> (submodule of the block or "" for the block itself, pre-hook?)
_HOOKS = {
    "block_pre": ("", True),
    "block_post": ("", False),
    "ls1_post": ("ls1", False),
    "norm2_pre": ("norm2", True),
    "ls2_post": ("ls2", False),
}


def _needed_hooks(points: set[str]) -> set[str]:
    needed = set()
    if "block_input" in points:
        needed.add("block_pre")
    if "parallel_mlp" in points:
        needed |= {"norm2_pre", "block_post"}
    if "block_output" in points:
        needed.add("block_post")
    if "attn_branch" in points:
        needed.add("ls1_post")
    if "mlp_branch" in points:
        needed.add("ls2_post")
    return needed


class _BlockHook:
    """One hook of one block; a small object (not a closure) so it survives deepcopy and pickling."""

    def __init__(self, site: "ViTBlockSite", kind: str, block_index: int):
        self.site = site
        self.kind = kind
        self.block_index = block_index

    def __call__(self, module: nn.Module, *args: Any):
        return self.site.run_hook(self.kind, self.block_index, *args)


class ViTBlockSite:
    """The block hooks of one timm ViT, shared by every tuner that edits its blocks (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.blocks = find_vit_blocks(model)
        self._editors: dict[str, dict[str, BlockEditor]] = {point: {} for point in POINTS}
        self._hooks: dict[str, list[Any]] = {}  # hook kind -> removable handles, one per block
        self._pending: dict[int, torch.Tensor] = {}  # parallel_mlp deltas between norm2 and the block output

    @property
    def editors(self) -> dict[str, dict[str, BlockEditor]]:
        return {point: dict(editors) for point, editors in self._editors.items() if editors}

    def add_editor(self, model: nn.Module, point: str, key: str, editor: BlockEditor) -> None:
        """Route ``point`` of every block through ``editor``; ``key`` (the tuner's name) orders and removes it."""
        if point not in POINTS:
            raise ValueError(f"unknown ViT block point {point!r}; known: {list(POINTS)}")
        if key in self._editors[point]:
            raise KeyError(f"an editor with key {key!r} is already registered at {point}")
        self._editors[point] = dict(sorted({**self._editors[point], key: editor}.items()))
        self._sync_hooks(model)

    def remove_editor(self, model: nn.Module, point: str, key: str) -> None:
        """Unregister ``key`` at ``point``; hooks no point needs are removed, the last editor removes the site."""
        self._editors.get(point, {}).pop(key, None)
        self._sync_hooks(model)
        if not self.editors and model.__dict__.get(_SITE_ATTR) is self:
            del model.__dict__[_SITE_ATTR]

    def _sync_hooks(self, model: nn.Module) -> None:
        needed = _needed_hooks({point for point, editors in self._editors.items() if editors})
        for kind in sorted(set(self._hooks) - needed):
            for handle in self._hooks.pop(kind):
                handle.remove()
        for kind in sorted(needed - set(self._hooks)):
            sub, pre = _HOOKS[kind]
            handles = []
            for i, block in enumerate(model.blocks):
                target = getattr(block, sub) if sub else block
                hook = _BlockHook(self, kind, i)
                handles.append(target.register_forward_pre_hook(hook) if pre else target.register_forward_hook(hook))
            self._hooks[kind] = handles
        if not needed:
            self._pending.clear()

    def run_hook(self, kind: str, index: int, *args: Any):
        block = self.blocks[index]
        if kind == "block_pre":  # args = (inputs,)
            (inputs,) = args
            x = _chain(self._editors["block_input"], block, inputs[0])
            return None if x is inputs[0] else (x, *inputs[1:])
        if kind == "norm2_pre":
            (inputs,) = args
            delta = _sum_deltas(self._editors["parallel_mlp"], block, inputs[0])
            if delta is None:
                self._pending.pop(index, None)
            else:
                self._pending[index] = delta
            return None
        _, output = args
        if kind == "ls1_post":
            return _add(output, _sum_deltas(self._editors["attn_branch"], block, output))
        if kind == "ls2_post":
            return _add(output, _sum_deltas(self._editors["mlp_branch"], block, output))
        # block_post
        delta = self._pending.pop(index, None)
        if delta is not None:
            output = output + delta
        return _chain(self._editors["block_output"], block, output)


def _sum_deltas(editors: dict[str, BlockEditor], block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
    total = None
    for editor in editors.values():
        delta = editor(block, x)
        if delta is not None:
            total = delta if total is None else total + delta
    return total


def _add(x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor | None:
    return None if delta is None else x + delta


def _chain(editors: dict[str, BlockEditor], block: ViTBlock, x: torch.Tensor) -> torch.Tensor:
    for editor in editors.values():
        out = editor(block, x)
        if out is not None:
            x = out
    return x


def vit_block_site(model: nn.Module) -> ViTBlockSite:
    """The shared block site of ``model``, created on first use (it removes itself with its last editor)."""
    site = model.__dict__.get(_SITE_ATTR)
    if site is None:
        site = ViTBlockSite(model)
        model.__dict__[_SITE_ATTR] = site
    return site
