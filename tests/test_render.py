"""jobs.render: one PNG per chosen row, its image as the row describes it (EXIF applied), the
masks drawn where the rows say, from local and `s3://` outputs; `--sample` is the report's sample;
bad input exits 2 with one line.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hand_made_output import JOB, ROTATED_BOX, displayed, make_output
from PIL import Image

from jobs import render as render_job
from jobs import report as report_job
from mrcnn import storage
from mrcnn.overlay import MASK_OPACITY, instance_colour
from pipeline.segment import provenance


def run(*argv: str) -> int:
    return render_job.main(list(argv))


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """Where the images, the output and the overlays go: a local folder or a moto bucket."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def paths_file(base: str, *paths: str) -> str:
    uri = storage.join(base, "paths.txt")
    storage.write_bytes(uri, ("# chosen\n" + "\n".join(paths) + "\n\n").encode())
    return uri


def test_overlay_of_an_exif_rotated_image_tints_exactly_its_mask(base):
    made = make_output(base)
    out = storage.join(base, "overlays")
    assert (
        run(
            "--predictions", made.predictions, "--output", out, "--paths", paths_file(base, made.rotated_path)
        )
        == 0
    )

    overlay = np.array(
        Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "rotated.png")))).convert("RGB")
    )
    seen = displayed(storage.read_bytes(made.rotated_path)).astype(np.float64)
    assert overlay.shape == seen.shape == (120, 80, 3)  # displayed: the stored 120 x 80 turned a quarter
    inside = made.rotated_mask.astype(bool)
    tinted = np.round((1 - MASK_OPACITY) * seen + MASK_OPACITY * np.array(instance_colour(0)))
    assert np.abs(overlay[inside] - tinted[inside]).max() <= 1
    # Inside the box, below its caption and clear of its outline, the pixels off the mask are the image's.
    x1, y1, x2, y2 = (int(v) for v in ROTATED_BOX)
    region = np.zeros(inside.shape, bool)
    region[64:y2, x1 + 2 : x2 - 1] = True
    assert np.array_equal(overlay[region & ~inside], seen[region & ~inside])
    assert np.array_equal(overlay[: y1 - 1], seen[: y1 - 1])  # above the box: untouched


def test_sample_is_the_reports_gallery_and_filters_keep_their_instances(tmp_path, capsys):
    made = make_output(str(tmp_path))
    out = tmp_path / "overlays"
    assert run("--predictions", made.predictions, "--output", str(out), "--sample", "4", "--seed", "5") == 0
    assert "4 overlays" in capsys.readouterr().out
    report = tmp_path / "report"
    assert (
        report_job.main(
            ["--predictions", made.predictions, "--output", str(report), "--sample", "4", "--seed", "5"]
        )
        == 0
    )
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(
        p.stem for p in (report / "gallery").glob("*.jpg")
    )

    squares = tmp_path / "squares"
    assert (
        run(
            "--predictions",
            made.predictions,
            "--output",
            str(squares),
            "--sample",
            "20",
            "--categories",
            "square",
        )
        == 0
    )
    with_squares = sorted(
        row["path"].rsplit("/", 1)[1].removesuffix(".png")
        for row in made.rows
        if "square" in row["categories"]
    )
    assert sorted(p.stem for p in squares.glob("*.png")) == with_squares


def test_an_error_row_and_an_image_over_the_outputs_pixel_limit_are_skipped_with_a_line(tmp_path, capsys):
    made = make_output(str(tmp_path))
    gone = next(row["path"] for row in made.rows if row["error"] == "cannot read: not found")
    out = tmp_path / "overlays"
    assert (
        run(
            "--predictions",
            made.predictions,
            "--output",
            str(out),
            "--paths",
            paths_file(str(tmp_path), made.rotated_path, gone),
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "1 overlays" in captured.out and "(1 skipped)" in captured.out
    assert f"{gone}: an error row" in captured.err

    provenance.record_output(made.predictions, {**JOB, "max_pixels": 5000})  # the rotated image has 9,600
    assert (
        run(
            "--predictions",
            made.predictions,
            "--output",
            str(tmp_path / "limited"),
            "--paths",
            paths_file(str(tmp_path), made.rotated_path),
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "over the limit of 5000" in captured.err and "0 overlays" in captured.out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    made = make_output(str(tmp_path))
    missing = [str(tmp_path / "images" / f"never-{i}.png") for i in range(5)]
    listed = paths_file(str(tmp_path), made.rotated_path, *missing)
    assert run("--predictions", made.predictions, "--output", str(tmp_path / "o"), "--paths", listed) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "5 of its 6 paths have no row" in message and missing[0] in message and missing[4] not in message
    assert not (tmp_path / "o" / "rotated.png").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("--predictions", str(empty), "--output", str(tmp_path / "o"), "--sample", "2") == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "no Parquet part files" in message

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run("--predictions", made.predictions, "--output", str(blocker / "o"), "--sample", "2") == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "cannot write there" in message

    with pytest.raises(SystemExit) as neither:
        run("--predictions", made.predictions, "--output", str(tmp_path / "o"))
    assert neither.value.code == 2
    assert "give one of --paths FILE or --sample N" in capsys.readouterr().err
