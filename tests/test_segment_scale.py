"""What keeps a segmentation job's driver flat over millions of inputs (issue 25), checked on a few.

Ray Data keeps the stats of every block each operator puts out on the driver for the whole run;
the job keeps the last `pipeline.cluster.ray_compat.KEPT_BLOCK_STATS` of each. Here the bound is
lowered so that a run of a few dozen images exceeds it many times over: the driver must then hold
the same number of block stats whatever the number of inputs. Likewise the cut of the listing
into batches (`pipeline.segment.job.CutAhead`) runs only a bounded number of batches ahead of
decode, each a reference held on the driver. Figures at scale: BENCHMARKS.md
"At scale (issue 25)" (`benchmarks/scale.py`).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from jobs import segment as segment_job
from pipeline.cluster import ray_compat


def write_pngs(folder: str, count: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        with open(os.path.join(folder, f"{index:03d}.png"), "wb") as file:
            file.write(buffer.getvalue())


def held_block_stats(tmp_path, model_dir, monkeypatch, count: int) -> tuple[int, int]:
    """(most block stats the driver held at once, blocks put out) over a run of `count` images,
    with `KEPT_BLOCK_STATS` lowered to 2."""
    monkeypatch.setattr(ray_compat, "KEPT_BLOCK_STATS", 2)
    seen = {"held": 0, "blocks": 0}
    trim = ray_compat.trim_block_stats

    def recording_trim(executor, keep):
        blocks = sum(op.metrics.num_outputs_taken for op in executor._topology)
        seen["blocks"] = max(seen["blocks"], blocks)
        held = trim(executor, keep)
        seen["held"] = max(seen["held"], held)
        return held

    monkeypatch.setattr(ray_compat, "trim_block_stats", recording_trim)
    images, output = str(tmp_path / f"images-{count}"), str(tmp_path / f"out-{count}")
    write_pngs(images, count)
    argv = ["--input", images, "--output", output, "--model", model_dir, "--batch-size", "1",
            "--rows-per-file", "2"]  # fmt: skip
    assert segment_job.main(argv) == 0
    return seen["held"], seen["blocks"]


def test_the_driver_holds_a_bounded_number_of_block_stats_whatever_the_inputs(
    tmp_path, model_dir, ray_local, monkeypatch
):
    held, blocks = held_block_stats(tmp_path, model_dir, monkeypatch, 40)
    # Five operators put out one block per image or more (read, cut, decode, inference) and one
    # per file; of their stats the driver held at most twice the bound per operator (a list is
    # cut once it reaches twice the bound), not one per block.
    operators = 6
    assert blocks >= 3 * 40
    assert held <= 2 * 2 * operators < blocks / 4


def test_the_listing_is_cut_only_a_few_batches_ahead_of_decode(tmp_path, model_dir, ray_local, monkeypatch):
    """Blocks of paths weigh nothing in Ray Data's byte budgets: without `CutAhead` the cut puts
    out a batch per input long before decode takes them, one driver-side reference each."""
    from pipeline.segment import job

    # A listing block of a few paths (not 1 MiB), so that the cut runs as many small tasks, and
    # a bound of 2 waiting batches.
    monkeypatch.setattr(job, "TARGET_MAX_BLOCK_SIZE", 256)
    monkeypatch.setattr(ray_compat, "MAX_QUEUED_BLOCKS", 2)
    seen: list[int] = []
    count = ray_compat.queued_blocks

    def recording_count(topology, op):
        queued = count(topology, op)
        seen.append(queued)
        return queued

    monkeypatch.setattr(ray_compat, "queued_blocks", recording_count)
    images, output = str(tmp_path / "images"), str(tmp_path / "out")
    write_pngs(images, 40)
    argv = ["--input", images, "--output", output, "--model", model_dir, "--batch-size", "1"]
    assert segment_job.main(argv) == 0
    # The cut was held back (the policy ran), and never had more than the bound plus what its
    # running tasks put out (a listing block of 256 bytes holds a few paths) waiting.
    assert seen and max(seen) >= 2
    assert max(seen) <= 2 + 2 * 8 < 40
