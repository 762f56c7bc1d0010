"""`make demo`'s job end to end on a tiny budget: every artefact appears, and a second run resumes.

Assertions are on the plan the run recorded (steps planned, the schedule's end), never on times.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.dataset as pads
import pytest

from pipeline.train.budget import CALIBRATION_STEPS
from pipeline.train.metrics import read_history

pytestmark = pytest.mark.slow

# 48 images on 2 workers x 4: 6 steps per epoch, at most 24 steps, so the planner has steps to
# time (pipeline.train.budget.CALIBRATION_STEPS) and some to plan.
TINY_DEMO = ["--train-images", "48", "--val-images", "6", "--epochs", "4", "--preset", "tiny",
             "--overlays", "2"]  # fmt: skip


def _quickstart(workdir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.quickstart", "--workdir", str(workdir), *TINY_DEMO, *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_quickstart_produces_summary_model_masks_and_overlays_then_resumes(tmp_path):
    workdir = tmp_path / "demo"
    first = _quickstart(workdir, "--budget-minutes", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting clean" in first.stdout
    assert "budget 1 min" in first.stdout

    summary = json.loads((workdir / "summary.json").read_text())
    for key, kind in [("segm_AP", float), ("bbox_AP", float), ("images_segmented", int), ("errors", int),
                      ("seconds", float)]:  # fmt: skip
        assert isinstance(summary[key], kind), key
    # The summary reports what jobs.evaluate scored and what the training's epochs measured.
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    assert (summary["segm_AP"], summary["bbox_AP"]) == (evaluation["segm"]["AP"], evaluation["bbox"]["AP"])
    assert summary["budget_minutes"] == 1.0
    # --amp auto trains in float32 on a CPU, even one with native bf16 (BENCHMARKS.md).
    assert summary["amp"] == "off"
    epochs = read_history(str(workdir / "train" / "metrics.jsonl"))
    trained = sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)
    assert summary["train_images_per_second"] == pytest.approx(trained)
    plan = summary["plan"]
    assert 0 < summary["planned_steps"] == plan["steps"] <= 24 and plan["seconds_per_step"] > 0
    # The schedule ran to its end: the last planned step was taken and the learning rate is 0.
    history = read_history(str(workdir / "train" / "metrics.jsonl"))
    assert history[-1]["step"] == summary["steps"] == summary["planned_steps"]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert summary["images_segmented"] == 6 and summary["errors"] == 0
    assert (workdir / "train" / "model" / "model.json").exists()
    assert len(list((workdir / "overlays").glob("*.png"))) == 2
    rows = pads.dataset(str(workdir / "segments"), format="parquet").to_table(columns=["path"]).num_rows
    assert rows == 6
    assert "duckdb" in first.stdout

    second = _quickstart(workdir, "--budget-minutes", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming in" in second.stdout
    assert "already there" in second.stdout and "already complete" in second.stdout
    assert pads.dataset(str(workdir / "segments"), format="parquet").to_table(columns=["path"]).num_rows == 6
    assert json.loads((workdir / "summary.json").read_text())["plan"] == plan


def test_a_budget_too_short_for_any_useful_schedule_says_what_it_needs_and_still_finishes(tmp_path):
    """6 seconds: less than Ray's start-up. The run trains only the steps it times, says in one
    line how long the shortest useful schedule would need, and still writes every artefact."""
    workdir = tmp_path / "demo"
    result = _quickstart(workdir, "--budget-minutes", "0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "too slow for the shortest useful" in line]
    assert lines and all("would need --budget-minutes" in line for line in lines)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["plan"]["short_by_s"] > 0
    assert summary["steps"] == summary["planned_steps"] == CALIBRATION_STEPS
    assert summary["images_segmented"] == 6
    assert len(list((workdir / "overlays").glob("*.png"))) == 2


def test_bad_flags_are_one_line_and_touch_nothing(tmp_path):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "stale.txt").write_text("old run")
    bad = _quickstart(workdir, "--epochs", "0")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--epochs" in bad.stderr
    assert (workdir / "stale.txt").exists(), "a refused command touches nothing"
