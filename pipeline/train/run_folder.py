"""A training run's output folder: its layout, the run's identity, its checkpoints and the export.

Layout of `<output>/` (every file name of it is here, and nowhere else):
- `run.json`: the settings a resumed run must share with the run it resumes (preset, RoI op, mask
  loss, categories); written before the first epoch (`RunFolder.claim`).
- `checkpoints/`: Ray Train's run folder (`RunConfig(storage_path=<output>, name="checkpoints")`),
  one `epoch-NNNN/` folder per reported epoch and one `step-NNNNNNNNN/` per mid-epoch checkpoint
  (`--checkpoint-every`), each holding `training_state.pt`, and Ray's own record of which
  checkpoint is the latest, from which a new `TorchTrainer` on the same folder resumes.
- `metrics.jsonl` and `tensorboard/` (their contents: `pipeline.train.metrics`).
- `model/`, at the end: `weights.pt` and `model.json` (`mrcnn.model_folder`), what segmentation
  and evaluation load.

`training_state.pt` holds only tensors, numbers, strings, lists and dicts (state_dicts of the
model, optimizer, learning-rate schedule and gradient scaler, the epochs done, the optimizer
steps done in the run and in the epoch in progress, the metrics history), so it loads with
`torch.load(weights_only=True)`: a checkpoint is data, never pickled code.

A run is finished when its schedule is (`schedule_finished`): a re-run of the same command then
only exports, or, with a model already exported, does nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from mrcnn import storage
from mrcnn.categories import Category
from mrcnn.errors import UserError
from mrcnn.model_folder import SPEC_FILE
from pipeline.train.metrics import read_history

RUN_FILE = "run.json"
CHECKPOINTS_NAME = "checkpoints"
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MODEL_NAME = "model"


class OutputMismatch(UserError):
    """The output folder holds a run that the requested one cannot resume (one line)."""


@dataclass(frozen=True)
class RunIdentity:
    """What must stay the same for a run to resume from an output folder's checkpoints."""

    preset: str
    roi_op: str
    mask_loss: str
    categories: tuple[Category, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunIdentity:
        fields = json.loads(text)
        return cls(
            preset=fields["preset"],
            roi_op=fields["roi_op"],
            mask_loss=fields["mask_loss"],
            categories=tuple(Category(id=int(c["id"]), name=str(c["name"])) for c in fields["categories"]),
        )


@dataclass(frozen=True)
class RunFolder:
    """The output folder `uri` of a training run (local or s3://) and the paths inside it."""

    uri: str

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.uri, METRICS_FILE)

    @property
    def tensorboard_uri(self) -> str:
        return storage.join(self.uri, TENSORBOARD_DIR)

    @property
    def model_uri(self) -> str:
        return storage.join(self.uri, MODEL_NAME)

    def claim(self, identity: RunIdentity) -> bool:
        """Record `identity` in `run.json`, or check it against the one already there.

        Returns True when the folder already held this run (a re-run, which resumes). Raises
        `OutputMismatch` when it holds another run, and `StorageError` when the folder cannot be
        read or written: both before any training starts.
        """
        uri = storage.join(self.uri, RUN_FILE)
        if not storage.exists(uri):
            storage.write_bytes(uri, identity.to_json().encode())
            return False
        try:
            previous = RunIdentity.from_json(storage.read_bytes(uri).decode())
        except (ValueError, KeyError, TypeError) as error:
            raise OutputMismatch(f"{uri}: not a run description ({error!r}); use another --output") from error
        differences = [
            name
            for name in ("preset", "roi_op", "mask_loss", "categories")
            if getattr(previous, name) != getattr(identity, name)
        ]
        if differences:
            raise OutputMismatch(
                f"{self.uri} holds a run with another {', '.join(differences)} "
                f"({', '.join(f'{n}={_short(getattr(previous, n))}' for n in differences)}); "
                "use another --output to start a new run"
            )
        return True

    def completed_epochs(self) -> int:
        """Epochs recorded in `metrics.jsonl` (0 for a new output)."""
        history = read_history(self.metrics_uri)
        return int(history[-1]["epoch"]) if history else 0

    def is_complete(self, finished) -> bool:
        """True when a model was exported after the run's schedule finished; `finished(record)`
        says whether the last epoch record ends the schedule (`schedule_finished`)."""
        history = read_history(self.metrics_uri)
        return bool(history) and finished(history[-1]) and storage.exists(
            storage.join(self.model_uri, SPEC_FILE)
        )

    def latest_checkpoint(self):
        """(checkpoint, epoch, reported metrics) of the latest checkpoint Ray Train recorded here,
        or None."""
        from ray.train import Result

        filesystem, path = storage.resolve(self.uri)
        try:
            result = Result.from_path(storage.join(path, CHECKPOINTS_NAME), storage_filesystem=filesystem)
        except RuntimeError:  # no run folder, or no record of checkpoints in it yet
            return None
        if result.checkpoint is None:
            return None
        return result.checkpoint, int(result.metrics["epoch"]), result.metrics


def schedule_finished(
    last: dict, epoch_steps: int, epochs: int, max_steps: int | None, budgeted: bool
) -> bool:
    """Whether the run whose last epoch record or checkpoint report is `last` has nothing left
    to train for a job of `epochs` (and `max_steps`), with a time budget when `budgeted`.

    A run planned by a time budget is finished when its planned schedule is, if the job still asks
    for a budget; otherwise when it took the steps that the epochs and `max_steps` ask for (so a
    re-run with more epochs trains on). Records older than step counts count in epochs.
    """
    step = int(last.get("step", int(last["epoch"]) * epoch_steps))
    if budgeted and (last.get("budgeted") or "plan" in last):
        return step >= int(last["planned_steps"])
    wanted = epochs * epoch_steps
    return step >= (wanted if max_steps is None else min(wanted, max_steps))


def save_state(directory: str, state: dict) -> None:
    """Write a training state (see the module docstring for what it may hold) into `directory`."""
    torch.save(state, os.path.join(directory, STATE_FILE))


def load_state(directory: str) -> dict:
    """The training state saved by `save_state` in `directory`, on the CPU."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def export_model(checkpoint, folder: RunFolder, preset: str, roi_op: str, mask_loss: str, categories) -> str:
    """Write the model of Ray Train `checkpoint` to the run's `model/`; returns its URI."""
    from mrcnn.model import build_model
    from mrcnn.model_folder import save_model_folder, spec_for

    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    model = build_model(preset, len(categories) + 1, roi_op=roi_op, mask_loss=mask_loss)
    model.load_state_dict(state["model"])
    save_model_folder(model, spec_for(model, categories), folder.model_uri)
    return folder.model_uri


def _short(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{c.id}:{c.name}" for c in value) + "]"
    return str(value)
