"""jobs.make_shapes / mrcnn.shapes: a valid, deterministic COCO dataset, locally and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs import make_shapes
from mrcnn import storage
from mrcnn.coco import build_target, read_coco
from mrcnn.images import decode_image
from mrcnn.shapes import generate_shapes

SIZE = 64


def check_dataset(ground_truth: dict, read_image) -> None:
    """Everything a trainer relies on, checked on the written files."""
    assert [c["name"] for c in ground_truth["categories"]] == ["circle", "square", "triangle", "star"]
    assert [c["id"] for c in ground_truth["categories"]] == [1, 2, 3, 4]
    by_image: dict[int, list[dict]] = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    for image in ground_truth["images"]:
        assert (image["width"], image["height"]) == (SIZE, SIZE)
        pixels = read_image(image["file_name"])
        assert pixels.shape == (SIZE, SIZE, 3)
        annotations = by_image[image["id"]]
        assert 1 <= len(annotations) <= 5
        covered = np.zeros((SIZE, SIZE), dtype=int)
        for annotation in annotations:
            assert isinstance(annotation["segmentation"]["counts"], str)  # compressed RLE
            mask = mask_utils.decode(annotation["segmentation"])
            assert mask.shape == (SIZE, SIZE)
            assert mask.any()
            assert annotation["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            x, y = xs.min(), ys.min()
            assert annotation["bbox"] == [x, y, xs.max() + 1 - x, ys.max() + 1 - y]
            assert max(annotation["bbox"][2:]) <= SIZE / 2 + 1  # at most about half the image
            assert annotation["iscrowd"] == 0
            covered += mask
        # Visible parts: occluded pixels belong to the shape on top only.
        assert covered.max() == 1


def test_local_dataset_is_valid_coco(tmp_path, capsys):
    out = tmp_path / "shapes"
    code = make_shapes.main([str(out), "--num-images", "8", "--seed", "3", "--size", str(SIZE)])
    assert code == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "wrote 8 images" in summary
    reference = COCO(str(out / "annotations.json"))
    assert len(reference.getImgIds()) == 8
    ground_truth = json.loads((out / "annotations.json").read_text())
    check_dataset(ground_truth, lambda name: decode_image((out / "images" / name).read_bytes()))
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(1, 9)]


def test_dataset_reads_back_without_skips(tmp_path):
    result = generate_shapes(str(tmp_path), 4, seed=1, size=SIZE)
    dataset = read_coco(result.annotations_uri, result.images_root)
    assert dataset.skipped == {}
    assert sum(len(record.annotations) for record in dataset.images) == result.num_annotations
    record = dataset.images[0]
    target = build_target(record.annotations, record.height, record.width, dataset.category_to_label)
    assert target["masks"].shape == (len(record.annotations), SIZE, SIZE)
    assert set(target["labels"].tolist()) <= {1, 2, 3, 4}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_same_bytes_and_other_seeds_differ(tmp_path):
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        generate_shapes(str(tmp_path / name), 5, seed=seed, size=SIZE)
    first, again, other = (tree_bytes(tmp_path / name) for name in "abc")
    assert first == again
    assert first.keys() == other.keys()
    assert first["annotations.json"] != other["annotations.json"]
    assert first["images/000001.png"] != other["images/000001.png"]


def test_a_larger_dataset_extends_a_smaller_one(tmp_path):
    generate_shapes(str(tmp_path / "small"), 2, seed=0, size=SIZE)
    generate_shapes(str(tmp_path / "large"), 4, seed=0, size=SIZE)
    small, large = tree_bytes(tmp_path / "small"), tree_bytes(tmp_path / "large")
    assert all(large[name] == data for name, data in small.items() if name.startswith("images/"))


def test_s3_dataset_is_valid_coco(s3_bucket, tmp_path, capsys):
    out = f"{s3_bucket}/data/shapes"
    assert make_shapes.main([out, "--num-images", "3", "--size", str(SIZE)]) == 0
    assert out in capsys.readouterr().out
    data = storage.read_bytes(f"{out}/annotations.json")
    (tmp_path / "annotations.json").write_bytes(data)
    assert len(COCO(str(tmp_path / "annotations.json")).getImgIds()) == 3
    check_dataset(json.loads(data), lambda name: decode_image(storage.read_bytes(f"{out}/images/{name}")))
    dataset = read_coco(f"{out}/annotations.json", f"{out}/images")
    assert dataset.images[0].uri == f"{out}/images/000001.png"


@pytest.mark.parametrize(
    "argv",
    [
        ["out"],
        ["out", "--num-images", "0"],
        ["out", "--num-images", "many"],
        ["out", "--num-images", "2", "--size", "8"],
        ["out", "--num-images", "2", "--colour", "red"],
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        make_shapes.main(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error:" in error


def test_unusable_output_exits_2_with_one_line(capsys):
    assert make_shapes.main(["gs://bucket/shapes", "--num-images", "1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gs://bucket/shapes" in error


def test_generate_shapes_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_shapes(str(tmp_path), 0)
    with pytest.raises(ValueError, match="size"):
        generate_shapes(str(tmp_path), 1, size=16)


def test_runs_as_a_module(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "jobs.make_shapes", str(tmp_path), "--num-images", "2", "--size", "32"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "wrote 2 images" in completed.stdout
    assert (tmp_path / "annotations.json").exists()
