"""Mask losses and mask probabilities: the paper's decoupled sigmoid, and the softmax ablation.

Mask R-CNN predicts K binary masks per RoI and trains only the one of the ground-truth class with a
per-pixel sigmoid (binary cross-entropy): masks do not compete across classes, the box branch picks
the class. The softmax variant (Table 2b of the paper) makes the K masks compete through a per-pixel
softmax over classes with a multinomial loss; it is here only to reproduce that ablation.

Both are pure functions over the mask head's logits, as in torchvision's `roi_heads.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import (
    maskrcnn_inference,
    maskrcnn_loss,
    project_masks_on_boxes,
)

MaskLoss = Literal["sigmoid", "softmax"]
MASK_LOSSES: tuple[str, ...] = ("sigmoid", "softmax")


def sigmoid_mask_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
) -> Tensor:
    """The paper's L_mask: mean binary cross-entropy on the ground-truth class's mask only.

    Args:
        mask_logits: float[R, K, M, M] for the R positive RoIs of the batch (K includes background).
        proposals: per image, float[R_i, 4] xyxy positive RoIs.
        gt_masks: per image, uint8[G_i, H, W] ground-truth instance masks.
        gt_labels: per image, int64[G_i] labels in 1..K-1.
        matched_idxs: per image, int64[R_i] index of the ground truth each RoI matched.
    """
    return maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs)


def softmax_mask_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
) -> Tensor:
    """Per-pixel softmax over the K classes: inside the RoI's mask the target is its class, 0 outside.

    Same arguments as `sigmoid_mask_loss`; the targets are the ground-truth masks cropped and
    resampled into each RoI exactly as for the sigmoid loss, then binarised at 0.5.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([labels[idxs] for labels, idxs in zip(gt_labels, matched_idxs, strict=True)])
    targets = torch.cat(
        [
            project_masks_on_boxes(masks, boxes, idxs, size)
            for masks, boxes, idxs in zip(gt_masks, proposals, matched_idxs, strict=True)
        ]
    )
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    pixel_classes = labels[:, None, None] * (targets >= 0.5)
    return F.cross_entropy(mask_logits, pixel_classes)


def mask_probabilities(mask_logits: Tensor, labels: list[Tensor], mask_loss: MaskLoss) -> list[Tensor]:
    """Probability of each detection's mask for its predicted class, as trained.

    Args:
        mask_logits: float[R, K, M, M] for the R detections of the batch.
        labels: per image, int64[R_i] predicted labels.

    Returns:
        per image, float[R_i, 1, M, M] in 0..1.
    """
    if mask_loss == "sigmoid":
        return maskrcnn_inference(mask_logits, labels)
    all_labels = torch.cat(labels)
    probs = mask_logits.softmax(dim=1)[torch.arange(len(all_labels), device=all_labels.device), all_labels]
    return list(probs[:, None].split([len(per_image) for per_image in labels], dim=0))
