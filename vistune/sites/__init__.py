"""Sites: where tuners attach on each backbone family (one module per family)."""

from .unet import UNetSkip, UNetSkipSite, find_unet_skips, unet_skip_site

__all__ = ["UNetSkip", "UNetSkipSite", "find_unet_skips", "unet_skip_site"]
