"""Sites: where tuners attach on each backbone family (one module per family)."""

from .unet import UNetSkip, UNetSkipSite, find_unet_skips, unet_skip_site
from .vit import ViTBlock, ViTBlockSite, find_vit_blocks, vit_block_site, vit_patch_maps

__all__ = [
    "UNetSkip", "UNetSkipSite", "ViTBlock", "ViTBlockSite", "find_unet_skips", "find_vit_blocks", "unet_skip_site",
    "vit_block_site", "vit_patch_maps",
]
