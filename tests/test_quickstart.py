"""`make demo`'s job end to end on a tiny budget: every artefact appears, and a second run resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.dataset as pads
import pytest

pytestmark = pytest.mark.slow

TINY_DEMO = [
    "--train-images",
    "12",
    "--val-images",
    "6",
    "--epochs",
    "1",
    "--preset",
    "tiny",
    "--overlays",
    "2",
]


def _quickstart(workdir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.quickstart", "--workdir", str(workdir), *TINY_DEMO, *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_quickstart_produces_summary_model_masks_and_overlays_then_resumes(tmp_path):
    workdir = tmp_path / "demo"
    first = _quickstart(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting clean" in first.stdout

    summary = json.loads((workdir / "summary.json").read_text())
    for key, kind in [("segm_AP", float), ("bbox_AP", float), ("images_segmented", int), ("errors", int),
                      ("seconds", float)]:  # fmt: skip
        assert isinstance(summary[key], kind), key
    assert 0.0 <= summary["segm_AP"] <= 1.0 and 0.0 <= summary["bbox_AP"] <= 1.0
    assert summary["images_segmented"] == 6 and summary["errors"] == 0
    assert (workdir / "train" / "model" / "model.json").exists()
    assert len(list((workdir / "overlays").glob("*.png"))) == 2
    rows = pads.dataset(str(workdir / "segments"), format="parquet").to_table(columns=["path"]).num_rows
    assert rows == 6
    assert "duckdb" in first.stdout

    second = _quickstart(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming in" in second.stdout
    assert "already there" in second.stdout
    assert pads.dataset(str(workdir / "segments"), format="parquet").to_table(columns=["path"]).num_rows == 6


def test_bad_flags_are_one_line_and_touch_nothing(tmp_path):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "stale.txt").write_text("old run")
    bad = _quickstart(workdir, "--epochs", "0")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--epochs" in bad.stderr
    assert (workdir / "stale.txt").exists(), "a refused command touches nothing"
