"""Dense prediction from a frozen timm ViT: feature pyramids (HST side stages, or a plain-ViT simple pyramid for
the baselines), torchvision's FPN on top, a semantic-FPN segmentation head and torchvision FCOS/RetinaNet detectors,
and one factory that builds a task model for a method (``hst``, ``full``, ``linear``, ``lora``)."""

from .evaluate import box_ap50, evaluate_task
from .factory import METHODS, TASKS, build_task_model, task_trainable_parameters
from .io import create_vit, load_task_model, save_task_model
from .heads import SemanticFPNHead, build_detector
from .models import Classifier, Segmenter
from .pyramid import FPNBackbone, HSTPyramid, ViTSimplePyramid, vit_normalization

__all__ = [
    "METHODS", "TASKS", "Classifier", "FPNBackbone", "HSTPyramid", "SemanticFPNHead", "Segmenter", "ViTSimplePyramid",
    "box_ap50", "evaluate_task", "build_detector", "build_task_model", "create_vit", "load_task_model", "save_task_model",
    "task_trainable_parameters", "vit_normalization",
]
