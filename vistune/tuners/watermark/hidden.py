"""HiDDeN-style watermark encoder and extractor (Stable Signature's ``hidden/models.py``), PCA whitening, and
safetensors + JSON save/load of the extractor.

Input rule of the extractor: RGB images as ``(B, 3, H, W)`` floats in ``[0, 1]`` at their own resolution (the
global average pool accepts any size); images smaller than ``min_size`` pixels on a side are refused with a
``ValueError`` rather than read as "not watermarked". Inside, pixels are mapped to ``[-1, 1]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ...core.errors import CheckpointError
from ...core.serialization import atomic_write

EXTRACTOR_CONFIG = "config.json"
EXTRACTOR_WEIGHTS = "model.safetensors"
#: Folder name of the shipped extractor under ``assets/``.
SHIPPED_EXTRACTOR = "watermark-extractor"


class ConvBNAct(nn.Sequential):
    """3x3 conv -> BatchNorm (eps 1e-3) -> GELU: Stable Signature's ``ConvBNRelu`` (its code uses GELU)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout, eps=1e-3), nn.GELU())


@dataclasses.dataclass
class ExtractorConfig:
    """Size of a :class:`HiddenExtractor`: ``depth`` conv blocks of ``channels``, ``num_bits`` outputs."""

    num_bits: int = 48
    channels: int = 64
    depth: int = 4
    min_size: int = 8
    head: str = "pool"
    input_size: int = 32

    def __post_init__(self) -> None:
        for name in ("num_bits", "channels", "depth", "min_size", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head not in ("pool", "flatten"):
            raise ValueError(f"head must be 'pool' (any input size) or 'flatten' (resized to input_size), got {self.head!r}")
        if self.head == "flatten" and self.input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8 for the 'flatten' head, got {self.input_size}")


def check_images(x: Any, min_size: int = 1) -> torch.Tensor:
    """``x`` as a float ``(B, 3, H, W)`` batch in [0, 1], or a ``ValueError`` that says what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected images as (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(
            f"expected RGB images with 3 channels, got {x.shape[1]}; convert grayscale/RGBA to RGB first "
            "(vistune.tuners.watermark.detector.load_image does)"
        )
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"image of {x.shape[-2]}x{x.shape[-1]} px is smaller than the extractor's minimum of "
                         f"{min_size} px per side")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
    return x


class HiddenExtractor(nn.Module):
    """Watermark extractor W, returning ``k`` logits (bit ``i`` is ``logits[:, i] > 0``).

    ``head="pool"`` is Stable Signature's ``HiddenDecoder``: ``ConvBNAct(3, C)`` -> (depth-1) x ``ConvBNAct(C, C)``
    -> ``ConvBNAct(C, k)`` -> global average pool -> ``Linear(k, k)``; it reads any image size at its own
    resolution. ``head="flatten"`` resizes the image to ``input_size`` (bilinear, antialiased), runs the same
    blocks with the last three at stride 2 (to ``input_size / 8``) and reads the flattened map with a
    ``Linear``: position-aware, which trains far faster at the tiny sizes of the shipped model. Both end with
    the whitening ``W' y + b`` (identity until :func:`whiten` sets it).
    """

    def __init__(self, config: ExtractorConfig | None = None):
        super().__init__()
        self.config = config or ExtractorConfig()
        c, k = self.config.channels, self.config.num_bits
        if self.config.head == "pool":
            blocks = [ConvBNAct(3, c)] + [ConvBNAct(c, c) for _ in range(self.config.depth - 1)] + [ConvBNAct(c, k)]
            self.layers = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(k, k)
        else:
            if self.config.depth < 3:
                raise ValueError("the 'flatten' head needs depth >= 3")
            strides = [1] * (self.config.depth - 3) + [2, 2]  # with the last block: three halvings
            blocks = [ConvBNAct(3, c)] + [ConvBNAct(c, c, s) for s in strides] + [ConvBNAct(c, k, 2)]
            self.layers = nn.Sequential(*blocks)
            self.pool = nn.Flatten()
            side = self.config.input_size // 8
            self.linear = nn.Linear(k * side * side, k)
        self.register_buffer("whiten_weight", torch.eye(k))
        self.register_buffer("whiten_bias", torch.zeros(k))

    @property
    def num_bits(self) -> int:
        return self.config.num_bits

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits before whitening."""
        x = check_images(x, self.config.min_size)
        if self.config.head == "flatten" and tuple(x.shape[-2:]) != (self.config.input_size,) * 2:
            x = nn.functional.interpolate(x, size=(self.config.input_size,) * 2, mode="bilinear", align_corners=False,
                                          antialias=True)
        return self.linear(self.pool(self.layers(x * 2 - 1)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x) @ self.whiten_weight.T + self.whiten_bias


MESSAGE_CHANNELS, MESSAGE_SIDE = 8, 8


class HiddenEncoder(nn.Module):
    """HiDDeN watermark embedder (used to pre-train the extractor, and as the post-hoc baseline): image features,
    concatenated with the ±1 message broadcast over the image and a learned spatial map of the message
    (``Linear(k, 8 * 8 * 8)`` upsampled to the image, which lets small images carry position-dependent
    patterns), -> a tanh residual; ``x_w = clamp(x + scaling * residual, 0, 1)``."""

    def __init__(self, num_bits: int = 48, channels: int = 32, depth: int = 3, scaling: float = 0.03):
        super().__init__()
        self.num_bits, self.scaling = num_bits, scaling
        self.features = nn.Sequential(ConvBNAct(3, channels), *[ConvBNAct(channels, channels) for _ in range(depth - 1)])
        self.message = nn.Linear(num_bits, MESSAGE_CHANNELS * MESSAGE_SIDE**2)
        self.mix = ConvBNAct(channels + 3 + num_bits + MESSAGE_CHANNELS, channels)
        self.out = nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        x = check_images(x)
        if bits.shape != (x.shape[0], self.num_bits):
            raise ValueError(f"expected bits of shape ({x.shape[0]}, {self.num_bits}), got {tuple(bits.shape)}")
        signs = bits.to(x.dtype) * 2 - 1
        spatial = self.message(signs).view(-1, MESSAGE_CHANNELS, MESSAGE_SIDE, MESSAGE_SIDE)
        spatial = nn.functional.interpolate(spatial, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = x * 2 - 1
        broadcast = signs[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        residual = torch.tanh(self.out(self.mix(torch.cat([self.features(y), y, broadcast, spatial], 1))))
        return (x + self.scaling * residual).clamp(0, 1)


@torch.no_grad()
def whiten(extractor: HiddenExtractor, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """PCA-whiten the extractor on unwatermarked ``images`` (Stable Signature's ``finetune_ldm_decoder.py``):
    with raw logits y, mean mu and ``e, v = eigh(cov(y))``, set ``W' = diag(e^-1/2) v^T`` and ``b = -W' mu``, so
    whitened logits on clean images are centred, decorrelated and of unit variance (bits ~ fair coins). Stable
    Signature uses the unnormalised scatter matrix and a ``sqrt(k)`` factor, which only rescales the logits (the
    bits are the same); unit variance keeps the scale of the decoder-tuning BCE independent of the image count.

    Returns statistics of the raw logits (mean |mu|, condition number of the covariance).
    """
    was_training = extractor.training
    extractor.eval()
    ys = torch.cat([extractor.raw(images[i:i + batch_size]).double() for i in range(0, len(images), batch_size)])
    extractor.train(was_training)
    k = ys.shape[1]
    if ys.shape[0] <= k:
        raise ValueError(f"whitening {k} bits needs more than {k} images, got {ys.shape[0]}")
    mu = ys.mean(0)
    centred = ys - mu
    cov = centred.T @ centred / (len(ys) - 1)
    e, v = torch.linalg.eigh(cov)
    e = e.clamp_min(e.max() * 1e-9)
    weight = torch.diag(e.rsqrt()) @ v.T
    extractor.whiten_weight.copy_(weight.to(extractor.whiten_weight))
    extractor.whiten_bias.copy_((-weight @ mu).to(extractor.whiten_bias))
    return {"raw_mean_abs": float(mu.abs().mean()), "cov_condition": float(e.max() / e.min())}


def save_extractor(extractor: HiddenExtractor, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (atomically) and return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in extractor.state_dict().items()}
    data = safetensors.torch.save(state, metadata={"format": "pt"})
    atomic_write(directory / EXTRACTOR_WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))
    record = {"class": "HiddenExtractor", **dataclasses.asdict(extractor.config), **(extra or {})}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / EXTRACTOR_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return directory


def load_extractor(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> HiddenExtractor:
    """Load an extractor folder (default: the shipped ``assets/watermark-extractor``), frozen and in eval mode."""
    if path is None:
        from ...assets import asset_path

        path = asset_path(SHIPPED_EXTRACTOR)
    path = Path(path)
    if not (path / EXTRACTOR_CONFIG).is_file() or not (path / EXTRACTOR_WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a watermark extractor folder ({EXTRACTOR_CONFIG} + {EXTRACTOR_WEIGHTS})")
    record = json.loads((path / EXTRACTOR_CONFIG).read_text())
    fields = {f.name for f in dataclasses.fields(ExtractorConfig)}
    extractor = HiddenExtractor(ExtractorConfig(**{k: v for k, v in record.items() if k in fields}))
    try:
        state = safetensors.torch.load_file(str(path / EXTRACTOR_WEIGHTS))
        extractor.load_state_dict(state, strict=True)
    except Exception as err:
        raise CheckpointError(f"{path}: weights do not match the config: {err}") from err
    return extractor.requires_grad_(False).eval().to(device)
