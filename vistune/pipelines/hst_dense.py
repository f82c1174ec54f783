"""A dense-prediction pipeline on a (HST-)tuned timm ViT, in diffusers' pipeline conventions.

    from vistune.pipelines.hst_dense import HSTDenseModel, HSTDensePipeline

    pipe = HSTDensePipeline(model=HSTDenseModel.from_task_folder("out/seg-hst"))  # a scripts/train_hst.py output
    pipe.save_pretrained("hst-seg-pipeline")
    pipe = HSTDensePipeline.from_pretrained("hst-seg-pipeline")
    result = pipe(images)          # PIL images, arrays or a (B, 3, H, W) tensor in [0, 1]
    result.masks, result.visualizations

Like diffusers' Marigold pipelines: one model component (:class:`HSTDenseModel`, a ``ModelMixin`` +
``ConfigMixin`` so ``save_pretrained`` / ``from_pretrained`` handle a whole folder), ``__call__`` returning an
output dataclass with the predictions and visualisation images. Images are resized to the ViT's input size
(bilinear) for the model; masks and boxes are mapped back to each input image's own size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from PIL import Image

from ..dense.factory import build_task_model
from ..dense.io import CONFIG_FILE, WEIGHTS_FILE
from ..tuners.hst import HSTConfig

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Union[Image.Image, np.ndarray]]]

#: Colours of the classes in visualisations (class 0 of a segmentation is background and stays uncoloured).
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


class HSTDenseModel(ModelMixin, ConfigMixin):
    """A task model of :func:`vistune.dense.build_task_model` (ViT + HST or a baseline + head) as a diffusers
    model: its config rebuilds the architecture, its weights are the whole task model."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, task: str, method: str, num_classes: int, class_names: list, image_size: list, vit: dict,
                 build: dict):
        super().__init__()
        import timm

        network = timm.create_model(vit["architecture"], pretrained=False, **vit["model_args"])
        kwargs = dict(build)
        if kwargs.get("hst_config") is not None:
            kwargs["hst_config"] = HSTConfig.from_dict(kwargs["hst_config"])
        self.task_model = build_task_model(network, task, method, num_classes, **kwargs)
        self.task_model.requires_grad_(False)

    @classmethod
    def from_task_folder(cls, folder: str | Path) -> "HSTDenseModel":
        """Wrap a ``task_config.json`` + ``task_model.safetensors`` folder (``scripts/train_hst.py`` output)."""
        import safetensors.torch

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a task-model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = cls(**{k: config[k] for k in ("task", "method", "num_classes", "class_names", "image_size", "vit", "build")})
        model.task_model.load_state_dict(safetensors.torch.load_file(str(folder / WEIGHTS_FILE)), strict=True)
        return model.eval()

    def forward(self, images: torch.Tensor, *args: Any) -> Any:
        return self.task_model(images, *args)


@dataclass
class HSTDenseOutput(BaseOutput):
    """Predictions per input image.

    ``labels``: classify: the top class name per image; detect: the class names of each image's boxes.
    ``scores``: classify: the top probability per image; detect: the box scores per image.
    ``masks``: segment: an int64 ``(H, W)`` class-id map per image at the image's own size.
    ``boxes``: detect: a float ``(N, 4)`` xyxy array per image in the image's own pixels.
    ``visualizations``: the input images with the prediction drawn on them (PIL).
    """

    labels: Optional[list] = None
    scores: Optional[list] = None
    masks: Optional[list] = None
    boxes: Optional[list] = None
    visualizations: Optional[list] = None


def _to_uint8_list(images: ImageInput) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        batch = images[None] if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor in [0, 1], got {tuple(images.shape)}")
        return [(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8) for img in batch]
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(np.asarray(image.convert("RGB")))
        elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
            out.append(image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        else:
            raise ValueError(f"unsupported image {type(image).__name__}; pass PIL images, HxWx3 arrays or a tensor")
    if not out:
        raise ValueError("no images given")
    return out


class HSTDensePipeline(DiffusionPipeline):
    """Classification, semantic segmentation or detection with a tuned ViT (see the module docstring)."""

    model_cpu_offload_seq = "model"

    def __init__(self, model: HSTDenseModel):
        super().__init__()
        self.register_modules(model=model)

    @torch.no_grad()
    def __call__(self, images: ImageInput, score_threshold: float = 0.3, batch_size: int = 16) -> HSTDenseOutput:
        config = self.model.config
        arrays = _to_uint8_list(images)
        height, width = config.image_size
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        self.model.eval()
        labels, scores, masks, boxes, visuals = [], [], [], [], []
        names = list(config.class_names)
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start:start + batch_size]
            batch = torch.stack([
                F.interpolate(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255, size=(height, width),
                              mode="bilinear", align_corners=False)[0] for a in chunk
            ]).to(device, dtype)
            if config.task == "classify":
                probs = self.model(batch).float().softmax(-1).cpu()
                top, index = probs.max(-1)
                for array, p, i in zip(chunk, top.tolist(), index.tolist()):
                    labels.append(names[i])
                    scores.append(p)
                    visuals.append(_draw_label(array, f"{names[i]} {p:.2f}"))
            elif config.task == "segment":
                logits = self.model(batch).float()
                for array, logit in zip(chunk, logits):
                    full = F.interpolate(logit[None], size=array.shape[:2], mode="bilinear", align_corners=False)
                    mask = full[0].argmax(0).cpu().numpy().astype(np.int64)
                    masks.append(mask)
                    visuals.append(_draw_mask(array, mask))
            else:
                detections = self.model(list(batch))
                for array, det in zip(chunk, detections):
                    keep = det["scores"] >= score_threshold
                    scale = torch.tensor([array.shape[1] / width, array.shape[0] / height] * 2)
                    xyxy = (det["boxes"][keep].float().cpu() * scale).numpy()
                    ids = det["labels"][keep].cpu().tolist()
                    box_names = [names[i - 1] if 0 < i <= len(names) else str(i) for i in ids]
                    boxes.append(xyxy)
                    labels.append(box_names)
                    scores.append(det["scores"][keep].float().cpu().numpy())
                    visuals.append(_draw_boxes(array, xyxy, box_names, ids))
        return HSTDenseOutput(
            labels=labels or None, scores=scores or None, masks=masks or None, boxes=boxes or None,
            visualizations=visuals,
        )


def _draw_label(array: np.ndarray, text: str) -> Image.Image:
    from PIL import ImageDraw

    image = Image.fromarray(array)
    ImageDraw.Draw(image).text((2, 2), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def _draw_mask(array: np.ndarray, mask: np.ndarray) -> Image.Image:
    from torchvision.utils import draw_segmentation_masks

    classes = [c for c in np.unique(mask).tolist() if c != 0]
    if not classes:
        return Image.fromarray(array)
    stacked = torch.from_numpy(np.stack([mask == c for c in classes]))
    colors = [PALETTE[(c - 1) % len(PALETTE)] for c in classes]
    drawn = draw_segmentation_masks(torch.from_numpy(array.copy()).permute(2, 0, 1), stacked, alpha=0.5, colors=colors)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def _draw_boxes(array: np.ndarray, xyxy: np.ndarray, names: list[str], ids: list[int]) -> Image.Image:
    from torchvision.utils import draw_bounding_boxes

    if len(xyxy) == 0:
        return Image.fromarray(array)
    colors = [PALETTE[(i - 1) % len(PALETTE)] for i in ids]
    drawn = draw_bounding_boxes(torch.from_numpy(array.copy()).permute(2, 0, 1), torch.from_numpy(xyxy), labels=names,
                                colors=colors)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())
