"""Provenance of a segmentation output: `_JOB.json` written by the first run, checked by re-runs.

Jobs run through `jobs.segment.main` on the session's local Ray with a tiny random model; the
refused re-runs stop before Ray is used at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import segment as segment_job
from mrcnn import storage
from mrcnn.categories import Category
from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.torchvision_models import cache_path as torchvision_cache_path
from pipeline.segment.provenance import job_record

IMAGES = 4


def save_tiny_model(uri: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model("tiny", 3)
    save_model_folder(model, spec_for(model, (Category(1, "a"), Category(2, "b"))), uri)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    for i in range(IMAGES):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture
def model(tmp_path) -> str:
    """A model folder of this test's own, so that a test may replace its weights."""
    uri = str(tmp_path / "model")
    save_tiny_model(uri, seed=0)
    return uri


def run(images: str, output: str, model: str, *extra: str) -> int:
    argv = ["--input", images, "--output", output, "--model", model, "--batch-size", "2",
            "--score-threshold", "0.3", "--max-pixels", "5000", *extra]  # fmt: skip
    return segment_job.main(argv)


def sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def parts(output: str) -> list[str]:
    return sorted(name for name in os.listdir(output) if name.startswith("part-"))


def test_first_run_records_its_settings_and_success_repeats_them(images, model, tmp_path, ray_local):
    output = str(tmp_path / "out")
    assert run(images, output, model, "--limit", "2") == 0
    job = read_json(os.path.join(output, "_JOB.json"))
    assert job == {
        "model": model,
        "model_sha256": sha256(os.path.join(model, "weights.pt")),
        "model_json_sha256": sha256(os.path.join(model, "model.json")),
        "score_threshold": 0.3,
        "max_pixels": 5000,
        "amp": "auto",
        "schema_version": 1,
        "project_version": metadata.version("ray-mask-rcnn"),
    }
    assert read_json(os.path.join(output, "_SUCCESS.json"))["job"] == job


def test_a_rerun_with_the_same_settings_resumes(images, model, tmp_path, ray_local):
    output = str(tmp_path / "out")
    assert run(images, output, model, "--limit", "2") == 0
    # Batch size, rows per file and precision are not compared: they do not change which model
    # made a row (the precision is recorded, the first run's record stays).
    assert run(images, output, model, "--rows-per-file", "1", "--batch-size", "1", "--amp", "off") == 0
    assert read_json(os.path.join(output, "_JOB.json"))["amp"] == "auto"
    success = read_json(os.path.join(output, "_SUCCESS.json"))
    assert (success["images"], success["new_images"]) == (IMAGES, IMAGES - 2)


def test_other_weights_at_the_same_uri_exit_2_with_one_line(images, model, tmp_path, capsys, ray_local):
    output = str(tmp_path / "out")
    assert run(images, output, model, "--limit", "2") == 0
    before = sorted(os.listdir(output))
    save_tiny_model(model, seed=1)  # new weights, same folder, same model.json
    capsys.readouterr()

    assert run(images, output, model) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"segment: error: {output} holds rows made with other settings: model_sha256 ")
    assert "model_json_sha256" not in line and "score_threshold" not in line
    assert "re-run with the same settings" in line and "new --output" in line
    assert sorted(os.listdir(output)) == before  # refused before anything was touched


def test_another_threshold_or_pixel_limit_exits_2_naming_both(images, model, tmp_path, capsys, ray_local):
    output = str(tmp_path / "out")
    assert run(images, output, model, "--limit", "2") == 0
    capsys.readouterr()
    argv = ["--input", images, "--output", output, "--model", model, "--score-threshold", "0.5",
            "--max-pixels", "5000"]  # fmt: skip
    assert segment_job.main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "score_threshold 0.3 (now 0.5)" in line and "max_pixels" not in line
    assert run(images, output, model, "--max-pixels", "6000") == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "max_pixels 5000 (now 6000)" in line


def test_an_output_of_an_older_version_is_adopted_with_a_notice(images, model, tmp_path, capsys, ray_local):
    output = str(tmp_path / "out")
    assert run(images, output, model, "--limit", "2") == 0
    os.remove(os.path.join(output, "_JOB.json"))  # as written before _JOB.json existed
    capsys.readouterr()
    assert run(images, output, model) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segment: note:")]
    assert len(notes) == 1 and "_JOB.json written" in notes[0]
    adopted = read_json(os.path.join(output, "_JOB.json"))
    assert adopted["model_sha256"] == sha256(os.path.join(model, "weights.pt"))
    assert len(parts(output)) >= 2


def test_a_model_on_s3_hashes_as_its_local_copy(model, s3_bucket):
    remote = f"{s3_bucket}/models/tiny"
    for name in ("weights.pt", "model.json"):
        with open(os.path.join(model, name), "rb") as file:
            storage.write_bytes(f"{remote}/{name}", file.read())
    local, copied = job_record(model, 0.5, 100), job_record(remote, 0.5, 100)
    for field in ("model_sha256", "model_json_sha256"):
        assert copied[field] == local[field]
    assert copied["model"] == remote


def test_torchvision_weights_are_known_by_their_hub_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "torchvision:maskrcnn_resnet50_fpn_v2"
    cached = torchvision_cache_path(name.split(":")[1])
    # Not cached: the sha256 prefix in torchvision's file name (torch.hub checks it on download).
    prefix = job_record(name, 0.5, 100)["model_sha256"]
    assert prefix and os.path.basename(cached).endswith(f"-{prefix}.pth")
    os.makedirs(os.path.dirname(cached))
    shutil.copyfile(__file__, cached)  # any content: the hash is of the file the loader would read
    record = job_record(name, 0.5, 100)
    assert record["model_sha256"] == sha256(cached) and record["model_json_sha256"] is None
