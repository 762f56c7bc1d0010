"""Inference batches by orientation: the padded pixels of a batch, and when to split it in two.

torchvision's `GeneralizedRCNNTransform` resizes each image of a batch (scale
`min(min_size / short side, max_size / long side)`, output `floor(side * scale)`) and pads the batch
to its largest height and its largest width, each rounded up to a multiple of 32. A landscape
800x1333 input beside a portrait 1333x800 one pads both to 1344x1344: 41 % of the batch's pixels
are padding that the backbone, the FPN and the RPN head compute on all the same.

`orientation_groups` splits a batch as torchvision's reference training script groups its batches
(`GroupedBatchSampler` with aspect-ratio bins `[1]`: landscape `width >= height`, portrait the
rest), but only when the split removes at least `min_saving` of the batch's padded pixels (see
`MIN_SAVING`), and on a GPU only for batches of `GPU_MIN_SPLIT_BATCH` images or more. Pure functions
of image sizes; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SIZE_DIVISIBLE = 32
"""torchvision's `GeneralizedRCNNTransform.size_divisible`: the padded batch's sides are multiples."""

# Two forwards instead of one pay twice the fixed cost of a forward (kernel launches, the
# per-image RPN/NMS and RoI heads do not shrink with the pixels) and run each at a smaller batch,
# which fills a GPU less. A split is worth that only when the pixel work it removes is large: a
# quarter of the batch's padded pixels. A batch with one image of the other orientation at 800 px
# presets saves ~40 % (above), a batch of 4:3 and 16:9 photos of one orientation nothing, and
# those are the cases the rule is for; `benchmarks/aspect_grouping.py` measures both sides.
MIN_SAVING = 0.25

# On a GPU a half batch may leave the device idle for longer than the padding costs: measured on one
# H200 at 800 px (BENCHMARKS.md, "Orientation grouping"), splitting gained 7 % at batch 8 and 17 % at
# 16 and lost 6 % at batch 4. A CPU is busy whatever the batch, and there the split gained at batch
# 4 as at 8 (R50 at 800 px, 2 cores: 1.47x and 1.54x), so CPUs split any batch.
GPU_MIN_SPLIT_BATCH = 8


def min_batch_to_split(device_type: str) -> int:
    """The smallest batch `orientation_groups` may split on a device of `device_type` ("cuda", "cpu")."""
    return GPU_MIN_SPLIT_BATCH if device_type == "cuda" else 2


def input_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w): the size the model's transform resizes a `height x width` image to, up or down."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    # torch's interpolate with `recompute_scale_factor=True`: floor(float(side) * scale).
    return math.floor(height * scale), math.floor(width * scale)


def padded_size(sizes: Sequence[tuple[int, int]], size_divisible: int = SIZE_DIVISIBLE) -> tuple[int, int]:
    """(H, W) of the batch tensor that images of input `sizes` (h, w) are padded into."""
    if not sizes:
        return 0, 0
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return _round_up(height, size_divisible), _round_up(width, size_divisible)


def padded_pixels(sizes: Sequence[tuple[int, int]], size_divisible: int = SIZE_DIVISIBLE) -> int:
    """Pixels (per channel) of the padded batch tensor: `len(sizes) * H * W`."""
    height, width = padded_size(sizes, size_divisible)
    return len(sizes) * height * width


def padding_waste(groups: Sequence[Sequence[tuple[int, int]]], size_divisible: int = SIZE_DIVISIBLE) -> float:
    """Fraction (0..1) of the pixels of the padded batch tensors of `groups` that are padding.

    Each group is the input sizes (h, w) of one forward; 0.0 when there are no pixels at all.
    """
    total = sum(padded_pixels(group, size_divisible) for group in groups)
    if total == 0:
        return 0.0
    image = sum(h * w for group in groups for h, w in group)
    return 1.0 - image / total


def orientation_groups(
    sizes: Sequence[tuple[int, int]],
    min_saving: float = MIN_SAVING,
    size_divisible: int = SIZE_DIVISIBLE,
    min_batch: int = 2,
) -> list[list[int]]:
    """Indices into `sizes` (input sizes (h, w)), one list per forward to run.

    Landscape (w >= h) and portrait images become two groups, each in the input order, when the two
    padded batches hold at most `1 - min_saving` of the pixels of the one padded batch; otherwise
    (one orientation only, too small a saving, or fewer than `min_batch` images: see
    `min_batch_to_split`) a single group of every index. `min_saving=0` splits whenever both
    orientations are present.
    """
    indices = list(range(len(sizes)))
    if len(indices) < min_batch:
        return [indices] if indices else []
    landscape = [i for i in indices if sizes[i][1] >= sizes[i][0]]
    portrait = [i for i in indices if sizes[i][1] < sizes[i][0]]
    if not landscape or not portrait:
        return [indices] if indices else []
    split = sum(padded_pixels([sizes[i] for i in group], size_divisible) for group in (landscape, portrait))
    if split > (1.0 - min_saving) * padded_pixels(sizes, size_divisible):
        return [indices]
    return [landscape, portrait]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
