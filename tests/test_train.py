"""jobs.train on a real local Ray and a moto S3: flags, data stages, checkpoints, resume, export.

The tiny preset trains for one or two short epochs on a handful of 64 px shapes images; what is
checked is the plumbing (files in the output, resume from the right epoch, a model that loads and
detects), not the quality of the model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from s3_proxy import FlakyS3Proxy

from jobs import train as train_job
from mrcnn import build_model, storage
from mrcnn.categories import Category
from mrcnn.coco import read_coco
from mrcnn.shapes import generate_shapes
from mrcnn.weights import WeightsError
from pipeline.train.budget import CALIBRATION_STEPS
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingCollate, decode_training_batch
from pipeline.train.fault_injection import FAIL_AFTER_EPOCH_ENV
from pipeline.train.metrics import LOSS_NAMES, format_epoch, read_history, write_history
from pipeline.train.optimizer import lr_factor
from pipeline.train.run_folder import OutputMismatch, RunFolder, RunIdentity
from pipeline.train.weight_init import initialise_from, set_training_mode

# Shapes' category ids 1..4 become these, so the dataset has gaps as COCO does.
GAPPED_IDS = {1: 3, 2: 7, 3: 8, 4: 12}
TRAIN_FLAGS = ["--preset", "tiny", "--num-workers", "2", "--batch-size", "2", "--warmup-iters", "2"]


def make_dataset(root: str, num_images: int = 8, seed: int = 0) -> tuple[str, str]:
    """Shapes at 64 px, rewritten with the awkward cases of real COCO files.

    Category ids with gaps, a crowd region, an image without annotations, and degenerate
    annotations (a zero-area box, a two-point polygon). Returns (annotations URI, images URI).
    """
    generated = generate_shapes(root, num_images, seed=seed, size=64)
    coco = json.loads(storage.read_bytes(generated.annotations_uri))
    for category in coco["categories"]:
        category["id"] = GAPPED_IDS[category["id"]]
    for annotation in coco["annotations"]:
        annotation["category_id"] = GAPPED_IDS[annotation["category_id"]]
    empty_image = coco["images"][-1]["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != empty_image]
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    crowd = {"size": [64, 64], "counts": _rle_counts(np.pad(np.ones((10, 10), np.uint8), ((0, 54), (0, 54))))}
    coco["annotations"] += [
        {"id": next_id, "image_id": 1, "category_id": 3, "segmentation": crowd, "area": 100,
         "bbox": [0, 0, 10, 10], "iscrowd": 1},
        {"id": next_id + 1, "image_id": 1, "category_id": 7, "segmentation": [[5, 5, 20, 5, 20, 20]],
         "area": 0, "bbox": [5, 5, 0, 0], "iscrowd": 0},
        {"id": next_id + 2, "image_id": 2, "category_id": 8, "segmentation": [[1, 1, 2, 2]],
         "area": 1, "bbox": [1, 1, 1, 1], "iscrowd": 0},
    ]
    storage.write_bytes(generated.annotations_uri, json.dumps(coco).encode())
    return generated.annotations_uri, generated.images_root


def _rle_counts(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> tuple[str, str]:
    return make_dataset(str(tmp_path_factory.mktemp("shapes")))


def run_job(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


# --- flags and inputs: one line on stderr, exit 2, before any Ray work --------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--preset", "huge"], "--preset"),
        (["--roi-op", "warp"], "--roi-op"),
        (["--bogus"], "--bogus"),
        (["--val-annotations", "x.json"], "--val-images"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(local_data, tmp_path, extra, named, capsys):
    annotations, images = local_data
    argv = ["--train-annotations", annotations, "--train-images", images, "--output", str(tmp_path / "o")]
    assert exit_code([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert named in err
    assert not (tmp_path / "o").exists()


def exit_code(argv: list[str]) -> int:
    """`jobs.train`'s exit code for `argv`, in this process (argparse exits with its own)."""
    try:
        return train_job.main(argv)
    except SystemExit as exit:
        return exit.code


def test_missing_and_unreadable_annotations_give_one_line_and_exit_2(local_data, tmp_path, capsys):
    _, images = local_data
    output = str(tmp_path / "o")
    # As a user types it: the process exits 2 with one line, no traceback.
    missing = str(tmp_path / "missing.json")
    result = run_job("--train-annotations", missing, "--train-images", images, "--output", output)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and missing in result.stderr, result.stderr
    bad, no_images = str(tmp_path / "bad.json"), str(tmp_path / "no-images")
    (tmp_path / "bad.json").write_text("{not json")
    for argv, named in (
        (["--train-annotations", bad, "--train-images", images], bad),
        (["--train-annotations", local_data[0], "--train-images", no_images], no_images),
    ):
        assert exit_code([*argv, "--output", output]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and named in err, err


def test_help_documents_every_flag_with_its_default():
    help_text = train_job.build_parser().format_help()
    for flag in ("--preset", "--num-workers", "--epochs", "--batch-size", "--lr", "--roi-op",
                 "--mask-loss", "--max-failures", "--seed", "--warmup-iters", "--lr-schedule"):
        assert flag in help_text
    assert help_text.count("(default") >= 14


def test_output_of_another_run_is_refused(tmp_path):
    categories = (Category(1, "a"), Category(5, "b"))
    output = str(tmp_path / "run")
    folder = RunFolder(output)
    assert folder.claim(RunIdentity("tiny", "align", "sigmoid", categories)) is False
    assert folder.claim(RunIdentity("tiny", "align", "sigmoid", categories)) is True
    with pytest.raises(OutputMismatch, match="roi_op"):
        folder.claim(RunIdentity("tiny", "pool", "sigmoid", categories))


# --- data stages and schedule, without Ray ----------------------------------------------------


def test_training_rows_keep_masks_boxes_and_image_consistent_under_flips(local_data):
    dataset = read_coco(*local_data)
    records = dataset.to_records()
    batch = {key: np.array([r[key] for r in records], dtype=object) for key in records[0]}
    flipped_any = unflipped_any = False
    for _ in range(4):  # flips are random: enough draws to see both
        rows = decode_training_batch(batch, category_to_label=dataset.category_to_label, flip=True)
        images, targets = TrainingCollate()({key: _column(values) for key, values in rows.items()})
        assert len(images) == len(records)
        for record, image, target in zip(records, images, targets, strict=True):
            assert image.dtype == torch.float32 and image.shape == (3, record["height"], record["width"])
            masks = target["masks"]
            assert masks.dtype == torch.uint8 and masks.shape[1:] == image.shape[1:]
            assert len(masks) == len(target["boxes"]) == len(target["labels"])
            assert set(target["labels"].tolist()) <= {1, 2, 3, 4}
            for mask, box in zip(masks, target["boxes"], strict=True):
                ys, xs = np.nonzero(mask.numpy())  # shapes' boxes are their masks' boxes
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            original = torch.from_numpy(
                _decode(record["uri"]).astype(np.float32) / 255
            ).permute(2, 0, 1)
            if torch.equal(image, original):
                unflipped_any = True
            else:
                assert torch.equal(image, original.flip(-1))
                flipped_any = True
    assert flipped_any and unflipped_any
    no_annotations = targets[-1]
    assert no_annotations["boxes"].shape == (0, 4) and no_annotations["masks"].shape == (0, 64, 64)


def _column(values: list) -> np.ndarray:
    """A 1-D object array, one element per row, as Ray Data hands variable-size columns."""
    column = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        column[index] = value
    return column


def _decode(uri: str) -> np.ndarray:
    from mrcnn.images import decode_image

    return decode_image(storage.read_bytes(uri))


def _config(**changes) -> TrainConfig:
    fields = dict(
        train_annotations="a", train_images="i", output="o", preset="tiny", epochs=2, batch_size=2,
        num_workers=1, warmup_iters=10, lr_schedule="cosine",
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def test_lr_schedule_warms_up_then_decays_to_zero():
    config = _config()
    total = config.total_steps(config.steps_per_epoch(100))
    assert total == 100
    factors = [lr_factor(step, total, config.lr_schedule, config.warmup_iters) for step in range(101)]
    assert factors[0] == pytest.approx(0.001)
    # After the 10 warm-up steps, the cosine decay as if it had started at step 0.
    assert max(factors) == pytest.approx(factors[10]) == 0.5 * (1 + math.cos(math.pi * 10 / 100))
    assert factors[100] == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(20, total, "step", config.warmup_iters) == 1.0
    assert lr_factor(70, total, "step", config.warmup_iters) == pytest.approx(0.1)
    assert lr_factor(90, total, "step", config.warmup_iters) == pytest.approx(0.01)


def test_init_weights_copy_what_fits_and_freeze_the_backbone_batchnorm(tmp_path):
    torch.manual_seed(1)
    source = build_model("tiny", 3)  # other categories: its predictors do not fit
    path = str(tmp_path / "weights.pt")
    torch.save(source.state_dict(), path)
    model = build_model("tiny", 5)
    copied, total = initialise_from(model, path, log=False)
    assert 0 < copied < total
    own, theirs = model.state_dict(), source.state_dict()
    conv, scores = "backbone.body.layer1.0.conv1.weight", "roi_heads.box_predictor.cls_score.bias"
    assert torch.equal(own[conv], theirs[conv])
    assert own[scores].shape == (5,) and theirs[scores].shape == (3,)

    config = _config(init_weights=path)
    assert config.pretrained and config.backbone_start == "none"
    set_training_mode(model, config.pretrained, config.trainable_layers)
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)
    assert model.roi_heads.training and model.roi_heads.mask_head[0][0].weight.requires_grad

    with pytest.raises(WeightsError):
        initialise_from(model, str(tmp_path / "missing.pt"), log=False)


def test_init_weights_that_fit_nothing_end_with_one_error_line_and_exit_2(local_data, tmp_path):
    """After the reader's one warning about the dataset's degenerate annotations."""
    annotations, images = local_data
    path = tmp_path / "unrelated.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    result = run_job(
        "--train-annotations", annotations, "--train-images", images, "--output", str(tmp_path / "o"),
        "--init-weights", str(path),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "skipped 2 of" in lines[0], result.stderr
    assert lines[1].startswith("train: error:") and str(path) in lines[1]


def test_metrics_history_round_trips_and_prints_one_line(tmp_path):
    epoch = {"epoch": 1, "loss": 1.0, **{name: 0.2 for name in LOSS_NAMES}, "lr": 0.01,
             "images_per_second": 3.5, "segm": {"AP": 0.5, "AP50": 0.8, "AP75": 0.4}}
    uri = str(tmp_path / "metrics.jsonl")
    assert read_history(uri) == []
    write_history(uri, [epoch, {**epoch, "epoch": 2}])
    assert [e["epoch"] for e in read_history(uri)] == [1, 2]
    line = format_epoch(epoch, 2)
    assert "\n" not in line and "segm AP 0.500" in line and "mask 0.200" in line


# --- end to end on Ray --------------------------------------------------------------------------


@pytest.mark.slow
def test_max_steps_and_a_time_budget_end_the_schedule_at_the_last_planned_step(
    ray_local, local_data, tmp_path, capsys
):
    """`--max-steps` ends the run within an epoch; `--max-minutes` shorter than the start-up trains
    the calibration steps only. Either way the learning rate reaches 0 at the last planned step,
    the plan is in metrics.jsonl, and a re-run of the same command has nothing left to do."""
    annotations, images = local_data  # 8 images, 2 workers x 2: 2 steps per epoch
    base = ["--train-annotations", annotations, "--train-images", images, *TRAIN_FLAGS]

    output = str(tmp_path / "steps")
    argv = [*base, "--output", output, "--epochs", "2", "--max-steps", "3"]
    assert train_job.main(argv) == 0
    history = read_history(f"{output}/metrics.jsonl")
    assert [(e["epoch"], e["step"], e["planned_steps"]) for e in history] == [(1, 2, 3), (2, 3, 3)]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # After step 2 of 3 (the one warm-up step of a 3-step plan is over): the default SGD rate of
    # 0.02 per 16 images for 2 workers x 2 images, on the cosine at 2/3.
    assert history[0]["lr"] == pytest.approx(0.02 * 4 / 16 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    capsys.readouterr()
    assert train_job.main(argv) == 0
    assert "already complete" in capsys.readouterr().out

    output = str(tmp_path / "budget")
    argv = [*base, "--output", output, "--epochs", "8", "--max-minutes", "0.01"]
    assert train_job.main(argv) == 0
    last = read_history(f"{output}/metrics.jsonl")[-1]
    assert last["step"] == last["planned_steps"] == last["plan"]["steps"] == CALIBRATION_STEPS < 16
    assert last["plan"]["short_by_s"] > 0 and last["plan"]["seconds_per_step"] > 0
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)
    assert os.path.exists(f"{output}/model/model.json")
    capsys.readouterr()
    assert train_job.main(argv) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_a_worker_dying_after_a_checkpoint_resumes_from_it(
    ray_local, local_data, tmp_path, monkeypatch, capsys
):
    """The rank-0 worker process exits after checkpointing epoch 1 (fault injection: `os._exit`,
    as a kill would end it). With `--max-failures 1` Ray Train restarts the workers, which resume
    from the checkpoint, within the same run; without retries the run fails, a re-run of the same
    command resumes, and a re-run of a finished run does nothing. (A node dying under a worker is
    `tests/test_multinode.py`'s.)"""
    annotations, images = local_data
    argv = ["--train-annotations", annotations, "--train-images", images, "--epochs", "2", *TRAIN_FLAGS]
    monkeypatch.setenv(FAIL_AFTER_EPOCH_ENV, "1")

    output = str(tmp_path / "retried")
    assert train_job.main([*argv, "--output", output, "--max-failures", "1"]) == 0
    out = capsys.readouterr().out
    assert "fault injection" in out
    assert "resuming from checkpoint" in out and "(epoch 1 done)" in out
    assert [e["epoch"] for e in read_history(f"{output}/metrics.jsonl")] == [1, 2]
    assert os.path.exists(f"{output}/model/model.json")

    output = str(tmp_path / "failed")
    assert train_job.main([*argv, "--output", output]) == 1
    assert "training failed" in capsys.readouterr().err.strip().splitlines()[-1]
    assert [e["epoch"] for e in read_history(f"{output}/metrics.jsonl")] == [1]
    assert not os.path.exists(f"{output}/model")
    # The same command again, as a user re-runs a stopped job: it resumes from epoch 1's checkpoint.
    monkeypatch.delenv(FAIL_AFTER_EPOCH_ENV)
    assert train_job.main([*argv, "--output", output]) == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint" in out and "epoch 1 of 2 done" in out
    assert [e["epoch"] for e in read_history(f"{output}/metrics.jsonl")] == [1, 2]
    assert {"epoch-0001", "epoch-0002"} <= set(os.listdir(f"{output}/checkpoints"))
    exported = os.path.getmtime(f"{output}/model/model.json")
    # And once more: a finished run is not trained again, nor its model exported again.
    assert train_job.main([*argv, "--output", output]) == 0
    assert "already complete" in capsys.readouterr().out
    assert os.path.getmtime(f"{output}/model/model.json") == exported
    assert len(read_history(f"{output}/metrics.jsonl")) == 2


@pytest.mark.slow
def test_s3_writes_that_keep_failing_end_the_run_clearly_without_output(s3_bucket, s3_server):
    annotations, images = make_dataset(f"{s3_bucket}/shapes")
    output = f"{s3_bucket}/runs/down"
    argv = ["--train-annotations", annotations, "--train-images", images, "--output", output,
            "--epochs", "1", "--num-cpus", "2", *TRAIN_FLAGS]
    with FlakyS3Proxy(s3_server, {"PUT": 1.0, "POST": 1.0}) as proxy:
        result = run_job(*argv, env={"AWS_ENDPOINT_URL": proxy.url, "MRCNN_S3_MAX_ATTEMPTS": "2"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error:") and output in last, last
    assert list(storage.iter_files(output)) == []


@pytest.mark.slow
def test_a_failing_training_worker_ends_the_job_with_its_one_line_and_no_traceback(tmp_path):
    """The loss of a learning rate of 1e12 is not finite at once: the worker raises, Ray Train
    fails the run, and the terminal gets our line, not the worker's and the controller's traces."""
    annotations, images = make_dataset(str(tmp_path / "shapes"))
    result = run_job(
        "--train-annotations", annotations, "--train-images", images, "--output", str(tmp_path / "run"),
        "--epochs", "1", "--num-cpus", "2", *TRAIN_FLAGS, "--lr", "1e12", "--warmup-iters", "0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "train: error: training failed: FloatingPointError: loss is not finite"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert "train: 2 worker(s) started" in result.stdout
