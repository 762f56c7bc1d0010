"""RoI heads of Mask R-CNN: torchvision's `RoIHeads` with the mask loss as a constructor choice.

torchvision hard-wires the sigmoid mask loss inside `RoIHeads.forward`. This subclass keeps every
submodule, sampler and post-processing step of torchvision (so state_dicts are identical) and only
routes the mask branch through `mrcnn.mask_loss`, which makes the softmax ablation possible. It
drops the keypoint branch, which Mask R-CNN for instance segmentation does not use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from mrcnn.mask_loss import MaskLoss, mask_probabilities, sigmoid_mask_loss, softmax_mask_loss


class MaskRoIHeads(RoIHeads):
    """Box branch (classification + box regression) and mask branch over sampled RoIs.

    Args beyond torchvision's `RoIHeads`:
        mask_loss: "sigmoid" (the paper's decoupled per-class binary masks) or "softmax"
            (per-pixel softmax over classes, the paper's Table 2b ablation). It selects both the
            training loss and how mask probabilities are read at inference.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_roi_pool: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
        *,
        mask_loss: MaskLoss = "sigmoid",
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.mask_loss = mask_loss

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """
        Args:
            features: FPN feature maps by level name, each float[B, C, H_l, W_l].
            proposals: per image, float[P_i, 4] xyxy RPN proposals in input-image pixels.
            image_shapes: (height, width) of each resized input image.
            targets: in training, per image `boxes` float[G_i, 4], `labels` int64[G_i],
                `masks` uint8[G_i, H, W].

        Returns:
            (detections, losses): in eval, per image `boxes` float[D_i, 4], `labels` int64[D_i],
            `scores` float[D_i], `masks` float[D_i, 1, M, M] per-RoI probabilities; in training,
            `loss_classifier`, `loss_box_reg`, `loss_mask`.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets
            )

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets
            )
            # Only RoIs matched to a foreground object learn a mask.
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [boxes[pos] for boxes, pos in zip(proposals, positive, strict=True)]
            positive_matches = [idxs[pos] for idxs, pos in zip(matched_idxs, positive, strict=True)]
            mask_logits = self._mask_logits(features, mask_proposals, image_shapes)
            loss = sigmoid_mask_loss if self.mask_loss == "sigmoid" else softmax_mask_loss
            loss_mask = loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                positive_matches,
            )
            return [], {
                "loss_classifier": loss_classifier,
                "loss_box_reg": loss_box_reg,
                "loss_mask": loss_mask,
            }

        boxes, scores, labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        mask_logits = self._mask_logits(features, boxes, image_shapes)
        masks = mask_probabilities(mask_logits, labels, self.mask_loss)
        detections = [
            {"boxes": b, "labels": lab, "scores": s, "masks": m}
            for b, lab, s, m in zip(boxes, labels, scores, masks, strict=True)
        ]
        return detections, {}

    def _mask_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """float[sum R_i, K, M, M] mask logits for the given RoIs."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
