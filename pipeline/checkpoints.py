"""What a training run keeps in its output folder to resume: checkpoints and the run's identity.

Layout of `<output>/`:
- `run.json`: the settings a resumed run must share with the run it resumes (preset, RoI op, mask
  loss, categories); written before the first epoch.
- `checkpoints/`: Ray Train's run folder (`RunConfig(storage_path=<output>, name="checkpoints")`),
  one `epoch-NNNN/` folder per reported epoch and one `step-NNNNNNNNN/` per mid-epoch checkpoint
  (`--checkpoint-every`), each holding `training_state.pt`, and Ray's own record of which
  checkpoint is the latest, from which a new `TorchTrainer` on the same folder resumes.
- `metrics.jsonl` (see `pipeline.metrics`), `tensorboard/` (see `pipeline.tensorboard_log`) and,
  at the end, `model/` (see `mrcnn.model_folder`).

`training_state.pt` holds only tensors, numbers, strings, lists and dicts (state_dicts of the
model, optimizer, learning-rate schedule and gradient scaler, the epochs done, the optimizer
steps done in the run and in the epoch in progress, the metrics history), so it loads with
`torch.load(weights_only=True)`: a checkpoint is data, never pickled code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from mrcnn import storage
from mrcnn.categories import Category

RUN_FILE = "run.json"
CHECKPOINTS_NAME = "checkpoints"
STATE_FILE = "training_state.pt"


class OutputMismatch(Exception):
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


def claim_output(output_uri: str, identity: RunIdentity) -> bool:
    """Record `identity` in `output_uri/run.json`, or check it against the one already there.

    Returns True when the folder already held this run (a re-run, which resumes). Raises
    `OutputMismatch` when it holds another run, and `StorageError` when the folder cannot be
    read or written: both before any training starts.
    """
    uri = storage.join(output_uri, RUN_FILE)
    if storage.exists(uri):
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
                f"{output_uri} holds a run with another {', '.join(differences)} "
                f"({', '.join(f'{n}={_short(getattr(previous, n))}' for n in differences)}); "
                "use another --output to start a new run"
            )
        return True
    storage.write_bytes(uri, identity.to_json().encode())
    return False


def save_state(directory: str, state: dict) -> None:
    """Write a training state (see the module docstring for what it may hold) into `directory`."""
    torch.save(state, os.path.join(directory, STATE_FILE))


def load_state(directory: str) -> dict:
    """The training state saved by `save_state` in `directory`, on the CPU."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def _short(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{c.id}:{c.name}" for c in value) + "]"
    return str(value)
