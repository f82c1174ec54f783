"""Box AP at IoU 0.5 (PASCAL VOC all-point interpolation), for the shapes-world detection task.

pycocotools (COCO AP) is not a dependency of vistune; AP50 with all-point interpolation is what VOC's
``voc_eval`` computes and what COCO's AP@[.5] approximates with 101 recall points.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou


def _average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_ap50(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    iou_threshold: float = 0.5,
) -> float:
    """Mean over ground-truth classes of the AP at ``iou_threshold``.

    ``predictions[i]`` has ``boxes`` (xyxy), ``scores``, ``labels``; ``targets[i]`` has ``boxes`` and ``labels``
    (torchvision detection format). Each ground-truth box matches at most one detection, greedily by score.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    if not classes:
        return float("nan")
    aps = []
    for cls in classes:
        records = []  # (score, is_true_positive)
        total = 0
        for pred, target in zip(predictions, targets):
            gt = target["boxes"][target["labels"] == cls].float().cpu()
            total += len(gt)
            keep = pred["labels"] == cls
            boxes, scores = pred["boxes"][keep].float().cpu(), pred["scores"][keep].float().cpu()
            order = torch.argsort(scores, descending=True)
            boxes, scores = boxes[order], scores[order]
            used = torch.zeros(len(gt), dtype=torch.bool)
            ious = box_iou(boxes, gt) if len(gt) and len(boxes) else torch.zeros(len(boxes), len(gt))
            for i in range(len(boxes)):
                hit = False
                if len(gt):
                    candidates = ious[i].clone()
                    candidates[used] = -1
                    best = int(torch.argmax(candidates))
                    if candidates[best] >= iou_threshold:
                        used[best] = True
                        hit = True
                records.append((float(scores[i]), hit))
        records.sort(key=lambda r: -r[0])
        hits = np.array([r[1] for r in records], dtype=np.float64)
        tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
        recall = tp / max(total, 1)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(_average_precision(recall, precision) if len(records) else 0.0)
    return float(np.mean(aps))


def evaluate_task(model: torch.nn.Module, task: str, dataset, batch_size: int = 16,
                  device: torch.device | str = "cpu", ignore_index: int = 255) -> dict[str, float]:
    """The task metric of ``model`` on ``dataset`` (items ``(image, target)``): ``accuracy`` (classify), ``miou``
    (segment; :func:`vistune.metrics.mean_iou` over all pixels) or ``ap50`` (detect; :func:`box_ap50`)."""
    from ..data.dense import dense_collate
    from ..metrics import mean_iou

    was_training = model.training
    model.eval()
    correct, total = 0, 0
    preds, targets_all = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images, targets = dense_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            images = images.to(device)
            if task == "classify":
                correct += int((model(images).argmax(-1).cpu() == targets).sum())
                total += len(targets)
            elif task == "segment":
                preds.append(model(images).argmax(1).cpu())
                targets_all.append(targets)
            else:
                preds.extend({k: v.cpu() for k, v in d.items()} for d in model(list(images)))
                targets_all.extend(targets)
    model.train(was_training)
    if task == "classify":
        return {"accuracy": correct / max(total, 1)}
    if task == "segment":
        num_classes = getattr(dataset, "num_classes", None) or int(torch.cat(targets_all).max()) + 1
        return {"miou": mean_iou(torch.cat(preds), torch.cat(targets_all), num_classes, ignore_index=ignore_index)}
    return {"ap50": box_ap50(preds, targets_all)}
