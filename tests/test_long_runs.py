"""Long runs people can watch: step records and TensorBoard curves, mid-epoch checkpoints that a
killed worker resumes from, and validation sharded over the workers.

The end-to-end test runs `jobs.train` in this process, on the suite's local Ray, as
tests/test_train.py does, with the tiny preset on eight 64 px shapes images.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import make_dataset

from jobs import train as train_job
from mrcnn.coco import read_coco
from mrcnn.evaluation import evaluate_coco
from mrcnn.model_folder import load_model
from pipeline.train.data import ValidationCollate, decode_validation_batch
from pipeline.train.fault_injection import FAIL_AFTER_STEP_ENV
from pipeline.train.metrics import (
    LOSS_NAMES,
    TensorBoardLog,
    read_history,
    read_records,
    write_history,
)
from pipeline.train.run_folder import load_state
from pipeline.train.validation import detect


def steps_of(uri: str) -> list[dict]:
    """The step records of a run's `metrics.jsonl`, in order."""
    return [record for record in read_records(uri) if record.get("kind") == "step"]


def _scalars(folder: str, tag: str) -> dict[int, float]:
    events = EventAccumulator(folder)
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    uri = str(tmp_path / "run" / "tensorboard")
    log = TensorBoardLog(uri)
    for step in (10, 20, 30):
        log.scalars(step, {"train/loss": 1.0 / step, "train/lr": 0.01})
        log.flush()
    log.close()
    # A process resumed from a checkpoint at step 20 logs step 30 again: TensorBoard keeps one.
    resumed = TensorBoardLog(uri, resumed_step=20)
    resumed.scalars(30, {"train/loss": 0.5})
    resumed.close()
    assert _scalars(uri, "train/loss") == pytest.approx({10: 0.1, 20: 0.05, 30: 0.5})
    assert _scalars(uri, "train/lr") == pytest.approx({10: 0.01, 20: 0.01})  # 30 purged, not relogged


def test_step_records_do_not_disturb_readers_of_epochs(tmp_path):
    uri = str(tmp_path / "metrics.jsonl")
    old_epoch = {"epoch": 1, "loss": 2.0}  # written before records had a kind
    records = [
        old_epoch,
        {"kind": "step", "step": 20, "epoch": 2, "loss": 1.5},
        {"kind": "validation", "step": 20, "epoch": 2, "segm": {"AP": 0.1}},
        {"kind": "epoch", "epoch": 2, "step": 40, "loss": 1.0},
    ]
    write_history(uri, records)
    assert [r["epoch"] for r in read_history(uri)] == [1, 2]
    assert [r["step"] for r in steps_of(uri)] == [20]
    assert read_records(uri) == records


@pytest.mark.slow
def test_a_worker_killed_after_a_step_checkpoint_resumes_mid_epoch_and_runs_the_planned_steps(
    ray_local, tmp_path, monkeypatch, capsys
):
    """2 workers x 1 image on 8 images: 4 steps per epoch, 8 in 2 epochs. Checkpoints every 3
    steps; the rank-0 worker dies right after the one of step 3, mid-epoch 1, and Ray Train
    restarts the workers from it (`--max-failures 1`). Validation every 3 steps and at epoch
    ends runs on both workers, each on half of the images."""
    annotations, images = make_dataset(str(tmp_path / "shapes"))
    output = tmp_path / "run"
    monkeypatch.setenv(FAIL_AFTER_STEP_ENV, "3")
    code = train_job.main([
        "--train-annotations", annotations, "--train-images", images,
        "--val-annotations", annotations, "--val-images", images, "--output", str(output),
        "--preset", "tiny", "--num-workers", "2", "--batch-size", "1", "--warmup-iters", "2",
        "--epochs", "2", "--checkpoint-every", "3", "--validate-every", "3", "--log-every", "1",
        "--max-failures", "1",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "worker exits on purpose after step 3" in out
    assert "resuming from checkpoint" in out and "at step 3" in out
    assert "step 8/8 (epoch 2/2)" in out  # the progress lines

    metrics = str(output / "metrics.jsonl")
    assert [r["step"] for r in steps_of(metrics)] == list(range(1, 9))  # each step once
    epochs = read_history(metrics)
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 4), (2, 8)]
    validations = [r["step"] for r in read_records(metrics) if r.get("kind") == "validation"]
    assert validations == [3, 6]
    for record in steps_of(metrics):
        assert np.isfinite([record[k] for k in ("loss", *LOSS_NAMES, "lr", "images_per_second")]).all()

    final = load_state(str(output / "checkpoints" / "epoch-0002"))
    assert final["step"] == 8 and final["scheduler"]["last_epoch"] == 8  # the plan's steps, no more
    assert (output / "checkpoints" / "step-000000006" / "training_state.pt").exists()

    tensorboard = str(output / "tensorboard")
    assert sorted(_scalars(tensorboard, "train/loss")) == list(range(1, 9))
    losses = {r["step"]: r["loss"] for r in steps_of(metrics)}
    assert _scalars(tensorboard, "train/loss") == pytest.approx(losses, rel=1e-6)
    assert sorted(_scalars(tensorboard, "val/segm_AP")) == [3, 4, 6, 8]

    # Validation sharded over 2 workers equals one process validating every image with the
    # model of the last epoch (the exported one).
    model, _ = load_model(str(output / "model"))
    torch.set_num_threads(1)  # the workers' threads: float sums in the same order
    dataset = read_coco(annotations, images)
    records = dataset.to_records()
    batch = {key: np.array([r[key] for r in records], dtype=object) for key in records[0]}
    rows = decode_validation_batch(batch)
    column = np.empty(len(rows["image"]), dtype=object)
    column[:] = rows["image"]
    batches = [ValidationCollate()({"image_id": np.array(rows["image_id"]), "image": column})]
    detections = detect(model, batches, dataset.categories, torch.device("cpu"), "off")
    single = evaluate_coco(dataset.evaluation_ground_truth(), detections)
    assert {t: epochs[-1][t] for t in ("bbox", "segm")} == single


def test_readme_training_example_parses_and_says_what_to_watch():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Training") : readme.index("### Bulk segmentation")]
    command = re.search(r"```bash\n(python -m jobs.train .*?)```", section, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))[3:]
    args = train_job.build_parser().parse_args(argv)
    assert args.backbone_weights == "imagenet" and args.amp == "bf16"
    for watched in ("tensorboard --logdir", "metrics.jsonl", "dashboard"):
        assert watched in section
