"""Training metrics: the `metrics.jsonl` file of a run, its TensorBoard event files, and the lines
printed as it trains.

One JSON object per line, told apart by `kind`:
- `"epoch"`, one per completed epoch (records written before `kind` existed have none and are
  epochs too): `epoch` (1-based), `step` (optimizer steps done in the run), `loss` and the five
  loss terms (`LOSS_NAMES`, means over the epoch's steps and workers), `lr` (at the end of the
  epoch), `images`, `seconds`, `images_per_second` (all workers together), `data_wait_seconds`
  (time a worker spent waiting for its next batch, mean over workers), `planned_steps` (the
  length of the learning-rate schedule), under a time budget `plan` (`pipeline.train.budget.Plan`
  as a dict) and `expected_end` (Unix time the last step should end), and with a validation set
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

TensorBoard event files go under `OUTPUT/tensorboard/`, local or s3://: `tensorboard --logdir
OUTPUT/tensorboard` (TensorBoard reads s3:// too) shows the curves: the loss terms, lr and images/s
of every logged step (`train/...`) and the validation APs (`val/...`). The rank-0 worker writes
with torch's `SummaryWriter` into a local folder and copies each event file whole to the output
after every flush, so that one path serves local disks and object stores alike (an S3 object
cannot be appended to). A run resumed from a checkpoint at step T writes a new event file whose
first event purges the old file's events after T, so TensorBoard shows each step once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from mrcnn import storage

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


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


def zero_sums() -> torch.Tensor:
    """Per-worker sums of training steps: the loss terms, then steps, images and seconds waited for
    batches (one row per step: `last_step` of `pipeline.train.loop.Trainer`)."""
    return torch.zeros(len(LOSS_NAMES) + 3, dtype=torch.float64)


def reduce_sums(sums: torch.Tensor, seconds: float, device: torch.device) -> tuple[torch.Tensor, float, int]:
    """`sums` added over all workers, the longest `seconds`, and the number of workers (a
    collective under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return sums, seconds, 1
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = sums.to(reduce_device)
    dist.all_reduce(totals)
    elapsed = torch.tensor([seconds], dtype=torch.float64, device=reduce_device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return totals.cpu(), float(elapsed.item()), dist.get_world_size()


def means(sums: torch.Tensor, seconds: float, workers: int) -> dict:
    """Loss means per step, images, seconds, throughput and data wait from reduced `sums`."""
    steps, images = max(1.0, float(sums[-3])), int(sums[-2])
    loss_means = {name: float(sums[i]) / steps for i, name in enumerate(LOSS_NAMES)}
    return {
        "loss": sum(loss_means.values()),
        **loss_means,
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "data_wait_seconds": float(sums[-1]) / workers,
    }


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


class TensorBoardLog:
    """Scalars of one process of a run, mirrored to `uri` (a folder) at every `flush`.

    Args:
        uri: the run's `OUTPUT/tensorboard` folder.
        resumed_step: the step of the checkpoint this process resumed from; events of earlier
            processes after it are purged. None for a run's first process.
    """

    def __init__(self, uri: str, resumed_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.uri = uri
        self._local = tempfile.mkdtemp(prefix="mrcnn-tensorboard-")
        purge = None if resumed_step is None else resumed_step + 1
        self._writer = SummaryWriter(self._local, purge_step=purge, flush_secs=3600)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (tag -> number) at `step`."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write pending events and copy the event files to `uri`."""
        self._writer.flush()
        for name in sorted(os.listdir(self._local)):
            with open(os.path.join(self._local, name), "rb") as file:
                storage.write_bytes(storage.join(self.uri, name), file.read())

    def close(self) -> None:
        """Flush, copy, and remove the local folder."""
        self.flush()
        self._writer.close()
        shutil.rmtree(self._local, ignore_errors=True)
