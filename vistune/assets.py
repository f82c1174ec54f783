"""Where the models vistune ships live: ``assets/`` at the repository root, built by ``scripts/build_assets.py``."""

from __future__ import annotations

import os
from pathlib import Path

#: The tiny shapes-world Stable Diffusion (diffusers folder layout).
TINY_SD = "tiny-sd-shapes"
#: The tiny shapes-world timm ViT (``local-dir:`` loadable).
TINY_VIT = "tiny-vit-shapes"


def assets_dir() -> Path:
    """The shipped ``assets/`` folder: ``$VISTUNE_ASSETS`` if set, else the repository's ``assets/``."""
    override = os.environ.get("VISTUNE_ASSETS")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "assets"


def asset_path(name: str) -> Path:
    """Path of one shipped model folder, or a ``FileNotFoundError`` that says how to get it."""
    path = assets_dir() / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"shipped model {name!r} not found at {path}. It comes with a source checkout of vistune "
            "(pip install -e . from the repository); rebuild it with `python scripts/build_assets.py`, "
            "or set VISTUNE_ASSETS to a folder that holds it."
        )
    return path


def sd_label(path: str | os.PathLike) -> str:
    """How a report names a Stable Diffusion folder: "the shipped tiny SD" for the shipped one, else its path."""
    try:
        shipped = asset_path(TINY_SD).resolve()
    except FileNotFoundError:
        shipped = None
    return "the shipped tiny SD" if Path(path).resolve() == shipped else f"`{path}`"


def load_tiny_sd(**kwargs):
    """``StableDiffusionPipeline.from_pretrained`` on the shipped tiny SD (no network), progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(asset_path(TINY_SD), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tiny_vit(**kwargs):
    """The shipped tiny timm ViT with its trained weights, in eval mode (no network).

    Note ``pretrained=True``: ``timm.create_model("local-dir:...")`` alone builds the architecture with random
    weights.
    """
    import timm

    return timm.create_model(f"local-dir:{asset_path(TINY_VIT)}", pretrained=True, **kwargs).eval()
