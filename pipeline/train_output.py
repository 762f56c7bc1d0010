"""What a training run's output holds: the latest checkpoint Ray Train recorded, whether the run's
schedule is finished, and the model exported from a checkpoint to `<output>/model/`.

A new `TorchTrainer` on the same storage path and name finds Ray's record of the checkpoints,
so a re-run of the same command resumes; a run is finished when its schedule is.
"""

from __future__ import annotations

from mrcnn import build_model, storage
from mrcnn.coco import CocoDataset
from mrcnn.model_folder import SPEC_FILE, save_model_folder, spec_for
from pipeline.checkpoints import CHECKPOINTS_NAME, load_state
from pipeline.metrics import METRICS_FILE, read_history
from pipeline.train_job import TrainJob, steps_per_epoch

MODEL_NAME = "model"


def completed_epochs(job: TrainJob) -> int:
    """Epochs recorded in the output's `metrics.jsonl` (0 for a new output)."""
    history = read_history(storage.join(job.output, METRICS_FILE))
    return int(history[-1]["epoch"]) if history else 0


def schedule_finished(job: TrainJob, last: dict, epoch_steps: int) -> bool:
    """Whether the run whose last epoch record or checkpoint report is `last` has nothing left
    to train for `job`.

    A run planned by a time budget is finished when its planned schedule is, if `job` still asks
    for a budget; otherwise when it took the steps that `job`'s epochs and `max_steps` ask for
    (so a re-run with more epochs trains on). Records older than step counts count in epochs.
    """
    step = int(last.get("step", int(last["epoch"]) * epoch_steps))
    if job.max_minutes is not None and (last.get("budgeted") or "plan" in last):
        return step >= int(last["planned_steps"])
    wanted = job.epochs * epoch_steps
    return step >= (wanted if job.max_steps is None else min(wanted, job.max_steps))


def is_complete(job: TrainJob, num_images: int) -> bool:
    """True when the output already holds a model exported after its schedule finished."""
    history = read_history(storage.join(job.output, METRICS_FILE))
    model_spec = storage.join(job.output, MODEL_NAME, SPEC_FILE)
    return (
        bool(history)
        and schedule_finished(job, history[-1], steps_per_epoch(job, num_images))
        and storage.exists(model_spec)
    )


def latest_checkpoint(filesystem, path: str):
    """(checkpoint, epoch, reported metrics) of the latest checkpoint Ray Train recorded under
    `path`, or None."""
    from ray.train import Result

    run_path = storage.join(path, CHECKPOINTS_NAME)
    try:
        result = Result.from_path(run_path, storage_filesystem=filesystem)
    except RuntimeError:  # no run folder, or no record of checkpoints in it yet
        return None
    if result.checkpoint is None:
        return None
    return result.checkpoint, int(result.metrics["epoch"]), result.metrics


def export_model(checkpoint, job: TrainJob, train_data: CocoDataset) -> str:
    """Write the model of `checkpoint` to `<output>/model/`; returns its URI."""
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    model = build_model(
        job.preset, len(train_data.categories) + 1, roi_op=job.roi_op, mask_loss=job.mask_loss
    )
    model.load_state_dict(state["model"])
    uri = storage.join(job.output, MODEL_NAME)
    save_model_folder(model, spec_for(model, train_data.categories), uri)
    return uri
