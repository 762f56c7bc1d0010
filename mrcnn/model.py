"""Mask R-CNN assembled from torchvision's detection modules, with the paper's ablations as options.

`build_model("r50-fpn", 91)` has the same modules, parameter names and shapes as torchvision's
`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`, and "r50-fpn-v2" as
`maskrcnn_resnet50_fpn_v2`, so torchvision's COCO checkpoints load with `strict=True`. On top:
- `roi_op="pool"` swaps RoIAlign for the quantized RoIPool in the box and mask heads;
- `mask_loss="softmax"` trains competing per-pixel softmax masks instead of per-class sigmoids;
- `model.paste_masks = False` returns per-RoI mask probabilities instead of pasting every mask into
  a full-resolution image, for `mrcnn.rle.masks_to_rle` to encode from the box crop.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    RPNHead,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mrcnn.mask_loss import MASK_LOSSES, MaskLoss
from mrcnn.precision import Float32AnchorGenerator, Float32BoxCoder, in_float32
from mrcnn.presets import Preset, get_preset
from mrcnn.roi_heads import MaskRoIHeads
from mrcnn.roi_pool import MultiScaleRoIPool

ROI_OPS: tuple[str, ...] = ("align", "pool")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FPN_LEVELS = ["0", "1", "2", "3"]
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise transform whose post-process can leave masks unpasted.

    With `paste_masks = False`, each detection's mask stays a float[1, M, M] probability map for
    its box (key `mask_probs`), and only boxes are mapped back to the original image size.
    """

    paste_masks: bool = True

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training or self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for prediction, resized, original in zip(result, image_shapes, original_image_sizes, strict=True):
            prediction["boxes"] = resize_boxes(prediction["boxes"], resized, original)
            prediction["mask_probs"] = prediction.pop("masks")
        return result


class MaskRCNN(TorchvisionMaskRCNN):
    """Mask R-CNN (He et al., 2017) built from a `Preset`.

    Forward, as torchvision's: in training, `model(images, targets)` with images a list of
    float[3, H, W] in 0..1 and targets `boxes` float[N, 4] xyxy pixels, `labels` int64[N] in
    1..num_classes-1, `masks` uint8[N, H, W], returns the five losses; in eval, `model(images)`
    returns per image `boxes` float[D, 4] xyxy in original pixels, `labels` int64[D], `scores`
    float[D] and either `masks` float[D, 1, H, W] or, with `paste_masks = False`, `mask_probs`
    float[D, 1, 28, 28].

    Args:
        preset: the architecture and input size.
        num_classes: number of classes including the background.
        roi_op: "align" (RoIAlign, the paper's) or "pool" (quantized RoIPool, for the ablation).
        mask_loss: "sigmoid" (decoupled per-class masks, the paper's) or "softmax".
    """

    def __init__(
        self,
        preset: Preset,
        num_classes: int,
        *,
        roi_op: str = "align",
        mask_loss: MaskLoss = "sigmoid",
    ) -> None:
        if roi_op not in ROI_OPS:
            raise ValueError(f"unknown roi_op {roi_op!r} (choose from {', '.join(ROI_OPS)})")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"unknown mask_loss {mask_loss!r} (choose from {', '.join(MASK_LOSSES)})")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and at least one class, got {num_classes}")

        backbone, anchors, rpn_head, box_head, mask_head = _parts(preset)
        mask_width = preset.mask_head_channels[-1]

        super().__init__(
            backbone,
            num_classes=None,
            min_size=preset.min_size,
            max_size=preset.max_size,
            rpn_anchor_generator=anchors,
            rpn_head=rpn_head,
            rpn_pre_nms_top_n_train=preset.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=preset.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=preset.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=preset.rpn_post_nms_top_n_test,
            box_roi_pool=_roi_extractor(roi_op, BOX_ROI_SIZE, preset.roi_sampling_ratio),
            box_head=box_head,
            box_predictor=FastRCNNPredictor(preset.box_representation, num_classes),
            box_batch_size_per_image=preset.box_batch_size_per_image,
            box_detections_per_img=preset.detections_per_image,
            mask_roi_pool=_roi_extractor(roi_op, MASK_ROI_SIZE, preset.roi_sampling_ratio),
            mask_head=mask_head,
            mask_predictor=MaskRCNNPredictor(mask_width, mask_width, num_classes),
        )
        heads = self.roi_heads
        self.roi_heads = MaskRoIHeads(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.mask_roi_pool,
            heads.mask_head,
            heads.mask_predictor,
            mask_loss=mask_loss,
            batch_size_per_image=preset.box_batch_size_per_image,
            detections_per_img=preset.detections_per_image,
        )
        self._keep_coordinates_in_float32()
        self.transform = DetectionTransform(preset.min_size, preset.max_size, IMAGENET_MEAN, IMAGENET_STD)
        self.preset = preset
        self.num_classes = num_classes
        self.roi_op = roi_op
        self.mask_loss = mask_loss

    def _keep_coordinates_in_float32(self) -> None:
        """Pixel coordinates stay float32 under autocast (`mrcnn.precision`); state_dict unchanged."""
        self.rpn.box_coder = Float32BoxCoder(self.rpn.box_coder.weights)
        self.roi_heads.box_coder = Float32BoxCoder(self.roi_heads.box_coder.weights)
        self.rpn.head.bbox_pred = in_float32(self.rpn.head.bbox_pred)
        predictor = self.roi_heads.box_predictor
        predictor.bbox_pred = in_float32(predictor.bbox_pred)

    @property
    def paste_masks(self) -> bool:
        """Whether eval outputs full-image `masks` (True) or per-RoI `mask_probs` (False)."""
        return self.transform.paste_masks

    @paste_masks.setter
    def paste_masks(self, value: bool) -> None:
        self.transform.paste_masks = value

    @property
    def score_threshold(self) -> float:
        """Detections scoring below this are dropped before NMS (torchvision's `box_score_thresh`)."""
        return self.roi_heads.score_thresh

    @score_threshold.setter
    def score_threshold(self, value: float) -> None:
        self.roi_heads.score_thresh = value


def build_model(
    preset: str,
    num_classes: int,
    *,
    roi_op: str = "align",
    mask_loss: MaskLoss = "sigmoid",
) -> MaskRCNN:
    """A randomly initialised Mask R-CNN; see `MaskRCNN` for the arguments and `mrcnn.presets`."""
    return MaskRCNN(get_preset(preset), num_classes, roi_op=roi_op, mask_loss=mask_loss)


def _parts(preset: Preset):
    """(backbone, anchor generator, RPN head, box head, mask head) of `preset`: torchvision's v1 or
    v2 heads (v2: convolutional box head, two RPN convolutions, BatchNorm in the FPN and heads)."""
    v2 = preset.heads == "v2"
    norm = nn.BatchNorm2d if v2 else None
    backbone = _resnet_fpn(preset, norm)
    channels = backbone.out_channels
    anchors = Float32AnchorGenerator(
        sizes=tuple((size,) for size in preset.anchor_sizes),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(preset.anchor_sizes),
    )
    rpn_head = RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2 if v2 else 1)
    if v2:
        box_head = FastRCNNConvFCHead(
            (channels, BOX_ROI_SIZE, BOX_ROI_SIZE),
            list(preset.box_head_channels),
            [preset.box_representation],
            norm_layer=nn.BatchNorm2d,
        )
    else:
        box_head = TwoMLPHead(channels * BOX_ROI_SIZE**2, preset.box_representation)
    mask_head = MaskRCNNHeads(channels, list(preset.mask_head_channels), 1, norm_layer=norm)
    return backbone, anchors, rpn_head, box_head, mask_head


def _resnet_fpn(preset: Preset, norm: type[nn.Module] | None) -> BackboneWithFPN:
    """ResNet C2..C5 with an FPN (P2..P5 plus a max-pooled P6), all layers trainable.

    BatchNorm in the ResNet, as torchvision builds it when no pretrained weights are asked for;
    a model loaded from COCO weights and run in eval mode computes what FrozenBatchNorm would.
    """
    resnet = {"resnet50": resnet50, "resnet18": resnet18}[preset.backbone](weights=None)
    stage2 = resnet.inplanes // 8
    return BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage2, stage2 * 2, stage2 * 4, stage2 * 8],
        out_channels=preset.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm,
    )


def _roi_extractor(roi_op: str, output_size: int, sampling_ratio: int) -> MultiScaleRoIAlign:
    if roi_op == "pool":
        return MultiScaleRoIPool(FPN_LEVELS, output_size)
    return MultiScaleRoIAlign(FPN_LEVELS, output_size, sampling_ratio=sampling_ratio)

