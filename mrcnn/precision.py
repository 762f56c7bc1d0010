"""Mixed precision that keeps pixel coordinates in float32: autocast for convolutions and heads only.

Under `torch.autocast`, torchvision's detection models compute coordinates in the low precision:
the anchors take the feature maps' dtype, `BoxCoder.decode_single` casts the reference boxes to
the deltas' dtype, and the deltas come from a low-precision conv or linear layer. bfloat16 has 8
bits of mantissa, so at 800x1333 inputs a coordinate is rounded to 4-8 px (what that does to
decoded boxes: BENCHMARKS.md, "Mixed precision"). The components here run those steps with autocast
disabled on float32 inputs, which costs a few small layers:
- `Float32AnchorGenerator`: anchors float32[A, 4] xyxy whatever the features' dtype;
- `Float32BoxCoder`: encode and decode in float32 (proposals, detections, regression targets);
- `Float32Linear` / `Float32Conv2d`: the box-regression layers (RPN `bbox_pred`, the box
  predictor's `bbox_pred`), whose outputs are offsets in box units.
RoIAlign already runs in float32 under autocast (torchvision registers it so), from float32
boxes. `autocast(device, precision)` is the one context every forward of this project uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_computes_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16), from Linux's flags.

    Elsewhere torch emulates bf16 on the CPU, slower than float32; an unreadable `cpuinfo` (not
    Linux) counts as no.
    """
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return False


def inference_precision(device: torch.device, requested: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """`requested` ("auto" or one of `PRECISIONS`) resolved for a forward on `device`.

    "auto": bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AMX or
    AVX512-BF16), fp16 on an older GPU, float32 ("off") on other CPUs. The model keeps pixel
    coordinates in float32 either way; what bf16 changes is the scores and mask probabilities in
    their third significant digit (BENCHMARKS.md, "bf16 on CPUs with AMX").
    """
    if requested != "auto":
        return _known(requested)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_computes_bf16(cpuinfo) else "off"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `precision` ("bf16", "fp16" or "off") on `device`'s type."""
    if _known(precision) == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def _known(precision: str) -> str:
    """`precision` itself when it is one of `PRECISIONS`; else ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return precision


@contextlib.contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class Float32BoxCoder(BoxCoder):
    """torchvision's `BoxCoder` with every encode and decode in float32, autocast or not."""

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        with _float32(proposals[0].device if proposals else torch.device("cpu")):
            return super().encode([b.float() for b in reference_boxes], [p.float() for p in proposals])

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with _float32(rel_codes.device):
            return super().decode(rel_codes.float(), [b.float() for b in boxes])

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        with _float32(rel_codes.device):
            return super().decode_single(rel_codes.float(), boxes.float())


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's `AnchorGenerator` whose anchors are float32 whatever the features' dtype."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        # The parent reads only the maps' sizes, dtype and device: empty float32 stand-ins.
        stand_ins = [f.new_empty((0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        with _float32(feature_maps[0].device):
            return super().forward(image_list, stand_ins)


class Float32Linear(nn.Linear):
    """A linear layer that runs in float32 under autocast (a box-regression output)."""

    def forward(self, input: Tensor) -> Tensor:
        with _float32(input.device):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(input.float(), self.weight.float(), bias)


class Float32Conv2d(nn.Conv2d):
    """A convolution that runs in float32 under autocast (a box-regression output)."""

    def forward(self, input: Tensor) -> Tensor:
        with _float32(input.device):
            weight = self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(input.float(), weight, bias)


def in_float32(layer: nn.Linear | nn.Conv2d) -> nn.Module:
    """`layer` as a `Float32Linear` / `Float32Conv2d` sharing its parameters (same state_dict)."""
    if type(layer) is nn.Linear:
        copy = nn.utils.skip_init(
            Float32Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
            device=layer.weight.device,
        )
    elif type(layer) is nn.Conv2d:
        copy = nn.utils.skip_init(
            Float32Conv2d, layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
            device=layer.weight.device,
        )
    else:
        raise TypeError(f"in_float32: expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    copy.weight = layer.weight
    copy.bias = layer.bias
    return copy
