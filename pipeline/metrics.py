"""Per-epoch training metrics: the `metrics.jsonl` file of a run and the one line printed per epoch.

One JSON object per completed epoch: `epoch` (1-based), `loss` and the five loss terms
(`LOSS_NAMES`, means over the epoch's steps and workers), `lr` (at the end of the epoch),
`images`, `seconds`, `images_per_second` (all workers together), `data_wait_seconds` (time a
worker spent waiting for its next batch, mean over workers), `step` (optimizer steps done in
all) and `planned_steps` (the length of the learning-rate schedule); under a time budget `plan`
(`pipeline.budget.Plan` as a dict) and `expected_end` (Unix time the last step should end); with a
validation set `bbox` and `segm`, each COCOeval's 12 stats by name (`mrcnn.evaluation.STAT_NAMES`).

The file is rewritten whole from the run's history, which travels inside each checkpoint, so
after a resume it holds exactly one line per epoch of the checkpoint it resumed from, never a
line of an epoch that was lost.
"""

from __future__ import annotations

import json
import time

from mrcnn import storage

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
METRICS_FILE = "metrics.jsonl"


def write_history(uri: str, history: list[dict]) -> None:
    """Write `history` (one dict per epoch, in order) to `uri` as JSON lines, atomically."""
    storage.write_bytes(uri, "".join(json.dumps(epoch) + "\n" for epoch in history).encode())


def read_history(uri: str) -> list[dict]:
    """The epochs recorded at `uri`; an empty list when there is no such file."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def format_epoch(metrics: dict, epochs: int) -> str:
    """One line for people: losses, learning rate, throughput and, if present, validation AP."""
    terms = " ".join(f"{name[len('loss_'):]} {metrics[name]:.3f}" for name in LOSS_NAMES)
    line = (
        f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.3f} ({terms}) "
        f"lr {metrics['lr']:.5f} {metrics['images_per_second']:.2f} images/s"
    )
    if "planned_steps" in metrics:
        line += f" step {metrics['step']}/{metrics['planned_steps']}"
    if "expected_end" in metrics:
        line += f" (ends about {time.strftime('%H:%M:%S', time.localtime(metrics['expected_end']))})"
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            stats = metrics[iou_type]
            line += f" {iou_type} AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f} AP75 {stats['AP75']:.3f}"
    return line
