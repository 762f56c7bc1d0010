"""Multi-scale RoIPool: the quantized RoI feature extractor of Fast R-CNN, over FPN levels.

Mask R-CNN's RoIAlign samples each bin bilinearly at regular points with no rounding. RoIPool
rounds the RoI and its bins to the feature grid, which misaligns features and masks by up to a
feature-map stride; the paper's Table 2c/2d ablation measures the cost. This module exists to
reproduce that ablation (`build_model(..., roi_op="pool")`), with exactly the same FPN level
assignment as torchvision's `MultiScaleRoIAlign` (Eqn. 1 of the FPN paper), so that the RoI
operator is the only difference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops._utils import convert_boxes_to_roi_format
from torchvision.ops.poolers import _filter_input, _setup_scales


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """RoIPool over several feature maps; a drop-in replacement for `MultiScaleRoIAlign`.

    It subclasses `MultiScaleRoIAlign` only to share its level mapping and to pass torchvision's
    type checks on `box_roi_pool` / `mask_roi_pool`; `sampling_ratio` is unused (RoIPool takes the
    max over the quantized bin).
    """

    def __init__(self, featmap_names: list[str], output_size: int) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio=0)

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """
        Args:
            x: feature maps by name, each float[B, C, H_l, W_l].
            boxes: one float[N_i, 4] per image, xyxy in pixels of the (resized) input image.
            image_shapes: (height, width) of each input image, to infer each level's scale.

        Returns:
            float[sum N_i, C, output_size, output_size] pooled features, in the order of `boxes`.
        """
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = convert_boxes_to_roi_format(boxes)
        if len(features) == 1:
            return roi_pool(features[0], rois, self.output_size, spatial_scale=self.scales[0])

        levels = self.map_levels(boxes)
        result = torch.zeros(
            (len(rois), features[0].shape[1], *self.output_size),
            dtype=features[0].dtype,
            device=features[0].device,
        )
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            in_level = torch.where(levels == level)[0]
            pooled = roi_pool(feature, rois[in_level], self.output_size, spatial_scale=scale)
            # Under autocast the levels may come back in different dtypes; match the result's.
            result[in_level] = pooled.to(result.dtype)
        return result
