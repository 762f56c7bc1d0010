"""The inference forward in float32 against bf16 autocast, on this machine's CPU, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/inference_precision.py [--preset small]
        [--images 96] [--size 256] [--batch-size 8] [--threads 1] [--passes 2]

What `jobs.segment --amp auto` decides for a CPU actor (`mrcnn.precision.inference_precision`):
bf16 where the CPU computes it (AMX or AVX512-BF16), float32 elsewhere, because emulated bf16
is slower than float32. This prints both on the same random model of `--preset` and the same
generated `--size` px shapes, shrunk to the preset's input as the decode task shrinks them; the
passes of the two precisions take turns (best pass kept), with `--threads` torch threads (1: what
each of the job's CPU actors runs), then the ratio. What bf16 does to the results is measured
with `jobs.segment` and `jobs.evaluate` (BENCHMARKS.md, "bf16 on CPUs with AMX").
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from jobs.cli import OneLineParser, bounded
from mrcnn import storage
from mrcnn.images import decode_image
from mrcnn.model import build_model
from mrcnn.precision import autocast, cpu_computes_bf16
from mrcnn.presets import PRESETS, get_preset
from mrcnn.shapes import CATEGORIES, generate_shapes
from pipeline.segment.decode import shrink_to_model_size

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="inference_precision.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small")
    parser.add_argument("--images", type=bounded(int, 1), default=96)
    parser.add_argument("--size", type=bounded(int, 32), default=256)
    parser.add_argument("--batch-size", type=bounded(int, 1), default=8)
    parser.add_argument("--threads", type=bounded(int, 1), default=1)
    parser.add_argument("--passes", type=bounded(int, 1), default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    model = build_model(args.preset, len(CATEGORIES) + 1).eval()
    model.paste_masks = False
    model.score_threshold = 0.05
    with tempfile.TemporaryDirectory() as folder:
        shapes = generate_shapes(folder, args.images, seed=0, size=args.size)
        images = [
            torch.from_numpy(
                shrink_to_model_size(decode_image(storage.read_bytes(path)), preset.min_size, preset.max_size)
            ).permute(2, 0, 1).float() / 255
            for path in sorted(storage.iter_files(shapes.images_root))
        ]  # fmt: skip

    best = {"off": float("inf"), "bf16": float("inf")}
    for _ in range(args.passes):
        for precision in best:
            start = time.perf_counter()
            with torch.inference_mode(), autocast(CPU, precision):
                for first in range(0, len(images), args.batch_size):
                    model(images[first : first + args.batch_size])
            best[precision] = min(best[precision], (time.perf_counter() - start) / len(images))
    print(
        f"{len(images)} shapes of {args.size} px at the model's {preset.min_size}-{preset.max_size} px, "
        f"preset {args.preset}, batch {args.batch_size}, {args.threads} thread(s) of {os.cpu_count()} "
        f"cores; this CPU computes bf16: {cpu_computes_bf16()}"
    )
    for precision, seconds in best.items():
        print(f"{precision:>5}: {1000 * seconds:.1f} ms per image")
    print(f"bf16 / float32 forward speed: {best['off'] / best['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
