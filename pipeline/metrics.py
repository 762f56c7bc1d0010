"""Training metrics: the `metrics.jsonl` file of a run and the lines printed as it trains.

One JSON object per line, told apart by `kind`:
- `"epoch"`, one per completed epoch (records written before `kind` existed have none and are
  epochs too): `epoch` (1-based), `step` (optimizer steps done in the run), `loss` and the five
  loss terms (`LOSS_NAMES`, means over the epoch's steps and workers), `lr` (at the end of the
  epoch), `images`, `seconds`, `images_per_second` (all workers together), `data_wait_seconds`
  (time a worker spent waiting for its next batch, mean over workers), `planned_steps` (the
  length of the learning-rate schedule), under a time budget `plan` (`pipeline.budget.Plan` as a
  dict) and `expected_end` (Unix time the last step should end), and with a validation set
  `bbox` and `segm`, each COCOeval's 12 stats by name (`mrcnn.evaluation.STAT_NAMES`);
- `"step"`, one every `--log-every` steps: `step`, `epoch` (the one in progress), the loss terms
  averaged over the steps since the previous record and over workers, `lr`, `images_per_second`
  and `data_wait_seconds` over those steps;
- `"validation"`, for `--validate-every` between epoch ends: `step`, `epoch`, `bbox`, `segm`,
  `val_seconds`.
`read_history` returns the epoch records only, as this file held before steps were logged.

The file is rewritten whole from the run's history, which travels inside each checkpoint, so
after a resume it holds exactly the records of the checkpoint it resumed from plus those logged
since, never a record of a step or epoch that was lost.
"""

from __future__ import annotations

import json
import time

from mrcnn import storage

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
METRICS_FILE = "metrics.jsonl"


def write_history(uri: str, history: list[dict]) -> None:
    """Write `history` (records in order) to `uri` as JSON lines, atomically."""
    storage.write_bytes(uri, "".join(json.dumps(record) + "\n" for record in history).encode())


def read_records(uri: str) -> list[dict]:
    """Every record at `uri`, of every kind; an empty list when there is no such file."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_history(uri: str) -> list[dict]:
    """The epoch records at `uri` (see the module docstring); empty when there is no such file."""
    return [record for record in read_records(uri) if record.get("kind", "epoch") == "epoch"]


def read_steps(uri: str) -> list[dict]:
    """The step records at `uri`, in order."""
    return [record for record in read_records(uri) if record.get("kind") == "step"]


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
    return line + format_ap(metrics)


def format_step(record: dict, total_steps: int, epochs: int) -> str:
    """One progress line per logged step: where the run is, its loss, lr and throughput."""
    return (
        f"step {record['step']}/{total_steps} (epoch {record['epoch']}/{epochs}): "
        f"loss {record['loss']:.3f} lr {record['lr']:.5f} {record['images_per_second']:.2f} images/s "
        f"data wait {record['data_wait_seconds']:.2f} s"
    )


def format_ap(metrics: dict) -> str:
    """` bbox AP .. AP50 .. AP75 .. segm AP ..` for the IoU types in `metrics`, or ''."""
    line = ""
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            stats = metrics[iou_type]
            line += f" {iou_type} AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f} AP75 {stats['AP75']:.3f}"
    return line
