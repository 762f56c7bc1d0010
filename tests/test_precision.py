"""Mixed precision keeps pixel coordinates in float32 (`mrcnn.precision`), on the CPU's bf16 autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from jobs import train as train_job
from mrcnn.model import MaskRCNN
from mrcnn.precision import PRECISIONS, Float32BoxCoder, autocast, cpu_computes_bf16, inference_precision
from mrcnn.presets import get_preset
from pipeline.segment.inference import PRECISION_CHOICES

CPU = torch.device("cpu")


def _boxes_found(reference: torch.Tensor, labels: torch.Tensor, other: dict, tolerance: float) -> int:
    """How many `reference` boxes have a box of the same label in `other` within `tolerance` px."""
    found = 0
    for box, label in zip(reference, labels, strict=True):
        same = other["boxes"].float()[other["labels"] == label]
        if len(same) and (same - box).abs().amax(1).min() <= tolerance:
            found += 1
    return found


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_boxes_stay_within_half_a_pixel_of_float32_at_800_px(precision):
    """The `small` architecture at torchvision's 800x1333 input size, random weights (seed 0).

    bf16 rounding of the convolutions moves the near-tied scores of a random model, so many of
    its detections swap for others; the detections both runs keep must agree within 0.5 px on
    every coordinate (measured: 12 of the top 30 in bf16). With whole-model autocast
    (torchvision's components as they are) none of the top 30 does: every coordinate is rounded
    to bf16's 4-8 px steps.
    """
    torch.manual_seed(0)
    model = MaskRCNN(dataclasses.replace(get_preset("small"), min_size=800, max_size=1333), 5).eval()
    model.score_threshold = 0.0
    image = torch.rand(3, 800, 1200, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (reference,) = model([image])
        with autocast(CPU, precision):
            (mixed,) = model([image])
    top = 30
    assert len(reference["boxes"]) >= top
    found = _boxes_found(reference["boxes"][:top], reference["labels"][:top], mixed, tolerance=0.5)
    assert found >= top // 3, f"only {found} of the top {top} float32 detections kept within 0.5 px"
    assert mixed["boxes"].dtype == torch.float32


def test_box_decoding_under_autocast_is_float32():
    """Deltas from a bf16 head and float32 proposals at 1333 px decode as they would in float32."""
    coder = Float32BoxCoder((10.0, 10.0, 5.0, 5.0))
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(200, 2, generator=generator) * 1200
    proposals = torch.cat([corner, corner + 20 + torch.rand(200, 2, generator=generator) * 100], 1)
    deltas = (torch.randn(200, 4, generator=generator) * 0.5).bfloat16()
    expected = coder.decode_single(deltas.float(), proposals)
    with autocast(CPU, "bf16"):
        decoded = coder.decode(deltas, [proposals]).reshape(-1, 4)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-3)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="bf16, fp16, off"):
        autocast(CPU, "fp8")


def test_amp_flag_takes_a_mode_and_alone_means_bf16():
    parser = train_job.build_parser()
    required = ["--train-annotations", "a.json", "--train-images", "i", "--output", "o"]
    assert parser.parse_args(required).amp == "off"
    assert parser.parse_args([*required, "--amp"]).amp == "bf16"
    assert parser.parse_args([*required, "--amp", "--epochs", "2"]).amp == "bf16"
    assert parser.parse_args([*required, "--amp", "fp16"]).amp == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--amp", "fp8"])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu sse avx512f avx512_bf16", "bf16"), ("fpu avx512f amx_tile amx_bf16", "bf16"), ("fpu avx2", "off")],
)
def test_auto_inference_precision_is_bf16_only_on_cpus_that_compute_it(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    assert cpu_computes_bf16(str(cpuinfo)) == (expected == "bf16")
    assert inference_precision(CPU, "auto", str(cpuinfo)) == expected
    # Asked for by name, a precision is used as asked, whatever the CPU.
    assert inference_precision(CPU, "off", str(cpuinfo)) == "off"
    assert inference_precision(CPU, "bf16", str(cpuinfo)) == "bf16"


def test_the_segment_jobs_amp_choices_are_the_precisions_and_auto():
    # Spelled out in `pipeline.segment.inference` so that the job's driver need not import torch.
    assert ("auto", *PRECISIONS) == PRECISION_CHOICES


def test_an_unreadable_cpuinfo_means_float32(tmp_path):
    assert not cpu_computes_bf16(str(tmp_path / "missing"))
    assert inference_precision(CPU, "auto", str(tmp_path / "missing")) == "off"
    with pytest.raises(ValueError, match="bf16, fp16, off"):
        inference_precision(CPU, "fp8")
