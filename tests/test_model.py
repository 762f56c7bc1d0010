"""The model package: torchvision compatibility, the RoI-op and mask-loss ablations, empty cases."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from mrcnn import PRESETS, build_model, get_preset
from mrcnn.mask_loss import mask_probabilities
from mrcnn.roi_pool import MultiScaleRoIPool

TORCHVISION_BUILDERS = {"r50-fpn": maskrcnn_resnet50_fpn, "r50-fpn-v2": maskrcnn_resnet50_fpn_v2}


@pytest.mark.parametrize("preset", ["r50-fpn", "r50-fpn-v2"])
@pytest.mark.parametrize("num_classes", [91, 4])
def test_r50_presets_have_torchvisions_state_dict(preset, num_classes):
    # Names and shapes only: on the meta device no weights are allocated or initialised.
    with torch.device("meta"):
        ours = build_model(preset, num_classes).state_dict()
        theirs = TORCHVISION_BUILDERS[preset](
            weights=None, weights_backbone=None, num_classes=num_classes
        ).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("preset", ["r50-fpn", "r50-fpn-v2"])
def test_torchvision_weights_give_identical_detections(preset):
    torch.manual_seed(0)
    # Few classes so that a random box head scores above the 0.05 threshold and detections exist.
    theirs = TORCHVISION_BUILDERS[preset](weights=None, weights_backbone=None, num_classes=3).eval()
    ours = build_model(preset, 3).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for model in (theirs, ours):
        model.transform.min_size = (192,)
        model.transform.max_size = 256
    images = [torch.rand(3, 150, 200), torch.rand(3, 180, 120)]
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    for want, have in zip(expected, got, strict=True):
        assert set(want) == set(have) == {"boxes", "labels", "scores", "masks"}
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("roi_op", ["align", "pool"])
@pytest.mark.parametrize("mask_loss", ["sigmoid", "softmax"])
def test_training_steps_reduce_the_loss(roi_op, mask_loss):
    torch.manual_seed(0)
    model = build_model("tiny", 3, roi_op=roi_op, mask_loss=mask_loss).train()
    images, targets = _two_annotated_images()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(12):
        losses = model(images, targets)
        assert set(losses) == {
            "loss_classifier",
            "loss_box_reg",
            "loss_mask",
            "loss_objectness",
            "loss_rpn_box_reg",
        }
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-3:]) / 3 < 0.7 * sum(totals[:3]) / 3, totals


def test_roi_op_pool_uses_quantized_roipool_in_both_heads():
    model = build_model("tiny", 3, roi_op="pool")
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, MultiScaleRoIPool)
    assert not isinstance(build_model("tiny", 3).roi_heads.box_roi_pool, MultiScaleRoIPool)


def test_roipool_quantizes_subpixel_shifts_that_roialign_sees():
    from torchvision.ops import MultiScaleRoIAlign

    features = {"0": torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)}
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    shifted = box + 0.3
    pool = MultiScaleRoIPool(["0"], 4)
    align = MultiScaleRoIAlign(["0"], 4, sampling_ratio=2)
    shapes = [(64, 64)]
    assert torch.equal(pool(features, [box], shapes), pool(features, [shifted], shapes))
    assert not torch.equal(align(features, [box], shapes), align(features, [shifted], shapes))


def test_softmax_mask_probabilities_are_the_predicted_class_share():
    logits = torch.randn(3, 4, 28, 28)
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    probs = torch.cat(mask_probabilities(logits, labels, "softmax"))
    expected = logits.softmax(dim=1)[torch.arange(3), torch.tensor([1, 3, 2])][:, None]
    torch.testing.assert_close(probs, expected)
    sigmoid = torch.cat(mask_probabilities(logits, labels, "sigmoid"))
    torch.testing.assert_close(sigmoid, logits[torch.arange(3), torch.tensor([1, 3, 2])][:, None].sigmoid())


def test_empty_cases_are_well_formed():
    model = build_model("tiny", 3)
    images, targets = _two_annotated_images()
    targets[1] = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, 96, 96), dtype=torch.uint8),
    }
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())

    model.eval().score_threshold = 1.1  # nothing can score above 1
    with torch.no_grad():
        pasted = model(images)
        model.paste_masks = False
        unpasted = model(images)
    assert pasted[0]["boxes"].shape == (0, 4)
    assert pasted[0]["masks"].shape == (0, 1, 96, 96)
    assert unpasted[0]["mask_probs"].shape == (0, 1, 28, 28)
    assert "masks" not in unpasted[0]


def test_unpasted_masks_keep_boxes_and_probabilities_of_the_pasted_output():
    torch.manual_seed(1)
    model = build_model("tiny", 3).eval()
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        pasted = model(images)[0]
        model.paste_masks = False
        unpasted = model(images)[0]
    assert len(pasted["boxes"]) > 0
    torch.testing.assert_close(unpasted["boxes"], pasted["boxes"])
    assert unpasted["mask_probs"].shape == (len(pasted["boxes"]), 1, 28, 28)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="roi_op 'warp'"):
        build_model("tiny", 3, roi_op="warp")
    with pytest.raises(ValueError, match="mask_loss 'l2'"):
        build_model("tiny", 3, mask_loss="l2")
    assert {"r50-fpn", "r50-fpn-v2", "small", "tiny"} <= set(PRESETS)


def _two_annotated_images():
    """Two 96x96 images, each with a bright square (label 1) and rectangle (label 2)."""
    images, targets = [], []
    for offset in (10, 30):
        image = torch.rand(3, 96, 96) * 0.5
        masks = torch.zeros((2, 96, 96), dtype=torch.uint8)
        masks[0, offset : offset + 30, offset : offset + 30] = 1
        masks[1, 60:90, 5:45] = 1
        image[:, masks.bool().any(dim=0)] = 0.9
        boxes = torch.tensor([[offset, offset, offset + 30, offset + 30], [5, 60, 45, 90]]).float()
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets
