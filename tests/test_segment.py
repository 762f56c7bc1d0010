"""jobs.segment end to end on a real local Ray: rows, schema, error rows, S3, manifests, resume.

A tiny random model (the "tiny" preset) segments a handful of 64-96 px images; what is checked is
the plumbing (one row per input, exact schema, RLE sizes, error rows, exactly-once after kills),
not the quality of the masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from s3_proxy import FlakyS3Proxy

from jobs import segment as segment_job
from mrcnn import storage
from mrcnn.model_folder import load_spec

THRESHOLD = 0.2
EXPECTED_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("category_ids", pa.list_(pa.int32())),
        ("categories", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("masks", pa.list_(pa.string())),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored `width x height` with EXIF orientation 6 (displayed `height x width`)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


# Every kind of input of the error-row contract, by file name; `None` marks a good image.
GOOD = {"a.png": png(64, 64, 1), "sub/b.PNG": png(96, 72, 2), "c.jpg": rotated_jpeg(80, 48)}
BAD = {
    "corrupt.png": png(64, 64, 3)[:40] + b"\x00garbage" * 8,
    "truncated.png": png(64, 64, 4)[:-200],
    "empty.jpg": b"",
    "text.jpg": b"just some text, not an image\n",
    "huge.png": png(200, 100, 5),
}
MAX_PIXELS = 10_000  # huge.png is 20,000 pixels; the good ones at most 96 x 72 = 6,912


def write_files(base: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(base, name), data)


def run(*argv: str) -> int:
    return segment_job.main(list(argv))


def read_rows(output: str) -> list[dict]:
    filesystem, path = storage.resolve(output)
    return pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()


def segment_args(input_uri: str, output: str, model: str, *extra: str) -> list[str]:
    return [
        "--input", input_uri, "--output", output, "--model", model,
        "--batch-size", "2", "--rows-per-file", "3", "--score-threshold", str(THRESHOLD),
        "--max-pixels", str(MAX_PIXELS), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, model_dir, ray_local):
    """One run over a local folder with good and bad images (and a file that is not listed)."""
    root = tmp_path_factory.mktemp("segment")
    images = str(root / "images")
    write_files(images, {**GOOD, **BAD, "notes.txt": b"not listed: wrong extension"})
    output = str(root / "out")
    assert run(*segment_args(images, output, model_dir)) == 0
    return images, output, read_rows(output)


def test_every_listed_image_has_exactly_one_row(folder_run):
    images, _, rows = folder_run
    paths = [row["path"] for row in rows]
    assert sorted(paths) == sorted(os.path.join(images, name) for name in {**GOOD, **BAD})
    assert len(set(paths)) == len(paths)


def test_schema_is_exactly_the_contract(folder_run):
    _, output, _ = folder_run
    files = [name for name in os.listdir(output) if name.endswith(".parquet")]
    assert files and all(name.startswith("part-") for name in files)
    for name in files:
        assert pq.read_schema(os.path.join(output, name)).equals(EXPECTED_SCHEMA)


def test_bad_files_become_error_rows_and_good_ones_are_segmented(folder_run, model_dir):
    images, _, rows = folder_run
    by_name = {os.path.relpath(row["path"], images): row for row in rows}
    for name in BAD:
        row = by_name[name]
        assert row["error"] and "\n" not in row["error"], name
        assert row["width"] is None and row["height"] is None
        assert row["category_ids"] == row["scores"] == row["boxes"] == row["masks"] == []
    assert "empty" in by_name["empty.jpg"]["error"]
    assert "10000" in by_name["huge.png"]["error"]
    for name in GOOD:
        assert by_name[name]["error"] is None, by_name[name]["error"]
    assert any(by_name[name]["masks"] for name in GOOD), "the random model should find something"
    assert {row["model"] for row in rows} == {model_dir}


def test_detections_are_consistent_and_rles_decode_to_the_row_size(folder_run, model_dir):
    _, _, rows = folder_run
    names = {c.id: c.name for c in load_spec(model_dir).categories}
    for row in rows:
        if row["error"] is not None:
            continue
        count = len(row["scores"])
        assert len(row["boxes"]) == len(row["masks"]) == len(row["category_ids"]) == count
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert all(score >= THRESHOLD for score in row["scores"])
        assert [names[i] for i in row["category_ids"]] == row["categories"]
        for (x1, y1, x2, y2), counts in zip(row["boxes"], row["masks"], strict=True):
            assert 0 <= x1 <= x2 <= row["width"] and 0 <= y1 <= y2 <= row["height"]
            mask = coco_mask.decode({"size": [row["height"], row["width"]], "counts": counts})
            assert mask.shape == (row["height"], row["width"])


def test_amp_reaches_the_actors_and_bf16_keeps_the_float32_boxes(tmp_path, model_dir, ray_local):
    """`--amp bf16` changes the forward (scores move), and the detections both precisions keep
    sit where float32 puts them: coordinates stay float32 (`mrcnn.precision`)."""
    images = str(tmp_path / "images")
    write_files(images, {f"{i}.png": png(96, 72, i) for i in range(4)})
    rows = {}
    for amp in ("off", "bf16"):
        output = str(tmp_path / amp)
        assert run(*segment_args(images, output, model_dir, "--score-threshold", "0.0", "--amp", amp)) == 0
        rows[amp] = {row["path"]: row for row in read_rows(output)}
    assert rows["off"].keys() == rows["bf16"].keys()
    moved = kept = compared = 0
    for path, reference in rows["off"].items():
        other = rows["bf16"][path]
        moved += reference["scores"] != other["scores"]
        boxes, labels = np.array(other["boxes"]), np.array(other["category_ids"])
        # A random model's scores are near-tied, so bf16 swaps some detections for others; those
        # it keeps (same category, box within 0.5 px of a float32 one) must be a good share.
        for box, label in zip(reference["boxes"][:10], reference["category_ids"][:10], strict=True):
            compared += 1
            same = boxes[labels == label]
            kept += bool(len(same)) and np.abs(same - np.array(box)).max(axis=1).min() <= 0.5
    assert moved > 0, "--amp bf16 gave float32's scores: the precision did not reach the actors"
    assert compared >= 20 and kept >= compared // 3, (kept, compared)


def test_sizes_are_those_of_the_displayed_image(folder_run):
    images, _, rows = folder_run
    sizes = {os.path.relpath(row["path"], images): (row["width"], row["height"]) for row in rows}
    assert sizes["a.png"] == (64, 64)
    assert sizes["sub/b.PNG"] == (96, 72)
    assert sizes["c.jpg"] == (48, 80)  # stored 80 x 48, EXIF orientation 6


def test_success_file_has_the_counts(folder_run):
    _, output, rows = folder_run
    success = json.loads(storage.read_bytes(os.path.join(output, "_SUCCESS.json")))
    assert success["images"] == success["new_images"] == len(rows) == len(GOOD) + len(BAD)
    assert success["errors"] == len(BAD)
    assert success["instances"] == sum(len(row["masks"]) for row in rows)
    assert success["duplicate_paths"] == 0
    assert success["images_per_second"] == pytest.approx(success["new_images"] / success["seconds"], rel=0.01)


def test_output_reads_with_duckdb(folder_run):
    duckdb = pytest.importorskip("duckdb")
    _, output, rows = folder_run
    query = f"select count(*), count(error) from '{output}/*.parquet'"
    [(count, errors)] = duckdb.sql(query).fetchall()
    assert (count, errors) == (len(rows), len(BAD))


def test_s3_input_and_output(s3_bucket, model_dir, ray_local):
    images = f"{s3_bucket}/photos"
    write_files(images, {"x/a.png": GOOD["a.png"], "c.JPG": GOOD["c.jpg"], "empty.jpg": b""})
    storage.write_bytes(f"{s3_bucket}/photos-other/z.png", GOOD["a.png"])  # a sibling prefix
    output = f"{s3_bucket}/out"
    assert run(*segment_args(images, output, model_dir)) == 0
    rows = read_rows(output)
    assert sorted(row["path"] for row in rows) == [
        f"{images}/c.JPG",
        f"{images}/empty.jpg",
        f"{images}/x/a.png",
    ]
    assert {row["path"]: row["width"] for row in rows}[f"{images}/c.JPG"] == 48
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS.json"))["images"] == 3


def test_manifests_txt_and_parquet(tmp_path, s3_bucket, model_dir, ray_local):
    local = tmp_path / "images"
    write_files(str(local), {"a.png": GOOD["a.png"], "b.png": GOOD["sub/b.PNG"]})
    write_files(s3_bucket, {"remote/c.jpg": GOOD["c.jpg"]})
    entries = [
        "images/a.png",  # relative to the manifest's folder
        str(local / "b.png"),
        "",
        f"{s3_bucket}/remote/c.jpg",
        "images/a.png",  # a second mention: still one row
        "images/missing.png",
        "images/notes.txt",
    ]
    (local / "notes.txt").write_text("listed in a manifest, so it gets a row (an error row)")
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(entries) + "\n")
    expected = {str(local / "a.png"), str(local / "b.png"), f"{s3_bucket}/remote/c.jpg",
                str(local / "missing.png"), str(local / "notes.txt")}  # fmt: skip

    assert run(*segment_args(str(manifest), str(tmp_path / "out-txt"), model_dir)) == 0
    rows = {row["path"]: row for row in read_rows(str(tmp_path / "out-txt"))}
    assert set(rows) == expected and len(read_rows(str(tmp_path / "out-txt"))) == len(expected)
    assert rows[str(local / "missing.png")]["error"] == "cannot read: not found"
    assert rows[str(local / "notes.txt")]["error"].startswith("not a supported image")
    assert rows[f"{s3_bucket}/remote/c.jpg"]["error"] is None

    parquet_manifest = f"{s3_bucket}/lists/inputs.parquet"
    table = pa.table({"path": sorted(expected), "other": list(range(len(expected)))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(parquet_manifest, buffer.getvalue())
    assert run(*segment_args(parquet_manifest, str(tmp_path / "out-parquet"), model_dir)) == 0
    assert sorted(row["path"] for row in read_rows(str(tmp_path / "out-parquet"))) == sorted(expected)


def test_rerun_completes_the_output_exactly_once(tmp_path, model_dir, ray_local):
    images = str(tmp_path / "images")
    write_files(images, {f"{i:02d}.png": png(64, 64, i) for i in range(8)})
    output = str(tmp_path / "out")

    # A first run stopped early (--limit keeps the first inputs of the listing) ...
    assert run(*segment_args(images, output, model_dir, "--limit", "3")) == 0
    assert sorted(row["path"] for row in read_rows(output)) == [f"{images}/{i:02d}.png" for i in range(3)]
    # ... and a killed writer's temporary file, which readers and the re-run ignore.
    (tmp_path / "out" / ".part-dead.parquet.0123.tmp").write_bytes(b"half a file")

    assert run(*segment_args(images, output, model_dir)) == 0
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == [f"{images}/{i:02d}.png" for i in range(8)]
    assert not (tmp_path / "out" / ".part-dead.parquet.0123.tmp").exists()
    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (success["images"], success["new_images"]) == (8, 5)

    # Losing a committed file (as if its batch never finished) re-creates just its rows.
    part = sorted(p for p in os.listdir(output) if p.startswith("part-"))[0]
    lost = len(pq.read_table(os.path.join(output, part)))
    os.remove(os.path.join(output, part))
    assert run(*segment_args(images, output, model_dir)) == 0
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == [f"{images}/{i:02d}.png" for i in range(8)]
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["new_images"] == lost

    # Nothing left to do: nothing is rewritten.
    before = sorted(os.listdir(output))
    assert run(*segment_args(images, output, model_dir)) == 0
    assert sorted(os.listdir(output)) == before
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["new_images"] == 0

    # A stray writer of a killed run committed two rows a second time, grouped differently (its
    # file has another name): the next run removes the extra copies and keeps one row per path.
    again = pa.Table.from_pylist(read_rows(output)[2:4], schema=EXPECTED_SCHEMA)
    pq.write_table(again, tmp_path / "out" / "part-stray.parquet")
    assert run(*segment_args(images, output, model_dir)) == 0
    paths = [row["path"] for row in read_rows(output)]
    assert sorted(paths) == [f"{images}/{i:02d}.png" for i in range(8)]
    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (success["images"], success["repaired_duplicates"], success["duplicate_paths"]) == (8, 2, 0)


def test_decoding_runs_on_tasks_not_on_the_inference_actor(tmp_path, model_dir, ray_local):
    """Ray Data must not fuse decode into the actor stage (it would decode on the accelerator's actor)."""
    from pipeline.segment.inputs import check_input
    from pipeline.segment.job import SegmentConfig, build_dataset

    write_files(str(tmp_path / "images"), {"a.png": GOOD["a.png"]})
    config = SegmentConfig(
        check_input(str(tmp_path / "images")), str(tmp_path / "out"), model_dir, load_spec(model_dir)
    )
    dataset = build_dataset(config, done=None)
    assert sum(int(batch["images"].sum()) for batch in dataset.iter_batches(batch_size=None)) == 1
    stats = dataset.stats()
    assert "MapBatches(decode_batch)" in stats
    assert "MapBatches(decode_batch)->MapBatches(Segmenter)" not in stats


def test_listing_is_cut_into_one_decode_task_per_batch(tmp_path, model_dir, ray_local):
    """Ray Data would gather the listing's small path blocks into one block (one decode task for the
    whole input, no parallel decode, nothing downstream until the listing ends); each batch of
    `batch_size` paths must become its own decode task and its own inference call."""
    from pipeline.segment.inputs import check_input
    from pipeline.segment.job import SegmentConfig, build_dataset

    write_files(str(tmp_path / "images"), {f"{i:02d}.png": png(40, 30, seed=i) for i in range(12)})
    config = SegmentConfig(
        check_input(str(tmp_path / "images")), str(tmp_path / "out"), model_dir, load_spec(model_dir),
        batch_size=4,
    )
    dataset = build_dataset(config, done=None)
    assert sum(int(batch["images"].sum()) for batch in dataset.iter_batches(batch_size=None)) == 12
    stats = dataset.stats()
    assert re.search(r"MapBatches\(decode_batch\): 3 tasks executed", stats), stats
    assert re.search(r"MapBatches\(Segmenter\): 3 tasks executed", stats), stats


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--actors", "3-1"], "--actors"),
        (["--actors", "two"], "--actors"),
        (["--score-threshold", "1.5"], "--score-threshold"),
        (["--max-pixels", "-1"], "--max-pixels"),
        (["--limit", "x"], "--limit"),
        (["--amp", "fp8"], "--amp"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run("--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", str(tmp_path), *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_inputs_exit_2_before_any_work(tmp_path, model_dir, capsys):
    out = str(tmp_path / "out")
    assert run("--input", str(tmp_path / "nope"), "--output", out, "--model", model_dir) == 2
    assert run("--input", str(tmp_path / "nope.txt"), "--output", out, "--model", model_dir) == 2
    pq.write_table(pa.table({"uri": ["a.png"]}), tmp_path / "m.parquet")
    assert run("--input", str(tmp_path / "m.parquet"), "--output", out, "--model", model_dir) == 2
    assert run("--input", str(tmp_path), "--output", out, "--model", str(tmp_path / "no-model")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("segment: error:") for line in lines)
    assert "'path'" in lines[2]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_gives_every_input_once(tmp_path, model_dir, ray_local):
    """A real kill: the driver and the local Ray it started die mid-run; the re-run completes."""
    count = 60
    images = str(tmp_path / "images")
    write_files(images, {f"{i:02d}.png": png(64, 64, i) for i in range(count)})
    output = tmp_path / "out"
    argv = segment_args(images, str(output), model_dir, "--num-cpus", "2")
    argv[argv.index("--rows-per-file") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    # Its own session, so that the kill takes the driver's local Ray (same process group) too.
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.segment", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(output.glob("part-*.parquet")):
            assert driver.poll() is None, "the driver ended before it committed anything"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Every visible file is whole (each one is read in full here), and the run is not complete.
    committed = read_rows(str(output))
    assert 0 < len(committed) < count, "the kill should land mid-run"
    assert not (output / "_SUCCESS.json").exists()

    assert run(*argv) == 0
    paths = sorted(row["path"] for row in read_rows(str(output)))
    assert paths == [f"{images}/{i:02d}.png" for i in range(count)]
    success = json.loads((output / "_SUCCESS.json").read_text())
    assert success["images"] == count and success["new_images"] < count


def segment_processes(marker: str, name: str) -> list[int]:
    """PIDs of the processes started with `MRCNN_TEST_RUN=marker` whose title contains `name`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                title = file.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = file.read().split(b"\0")
        except OSError:
            continue
        if name in title and f"MRCNN_TEST_RUN={marker}".encode() in environ:
            found.append(int(pid))
    return found


@pytest.mark.slow
def test_killing_an_inference_actor_mid_run_loses_and_duplicates_nothing(tmp_path, model_dir):
    """Ray restarts the killed actor and retries its batches; every input still has one row."""
    # Enough images that the actor is still busy when the first file lands: it starts beside
    # decode, finds batches decoded, and the tiny model then runs ~100 images a second.
    count = 240
    images = str(tmp_path / "images")
    write_files(images, {f"{i:03d}.png": png(64, 64, i) for i in range(count)})
    output = tmp_path / "out"
    # Three CPUs: the actor's and two for the tasks, so that files are committed while it runs.
    argv = segment_args(images, str(output), model_dir, "--num-cpus", "3")
    argv[argv.index("--rows-per-file") + 1] = "4"
    marker = os.urandom(8).hex()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MRCNN_TEST_RUN": marker}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.segment", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Kill the actor as soon as the first file lands: the actor starts beside decode, and once
        # it runs, the tiny model goes through the whole input in a few seconds.
        deadline = time.monotonic() + 300
        while not list(output.glob("part-*.parquet")):
            assert driver.poll() is None, "the driver ended before it committed anything"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        killed = None
        while killed is None:
            assert driver.poll() is None, "the driver ended before the kill"
            assert time.monotonic() < deadline
            actors = segment_processes(marker, "MapBatches(Segmenter)")
            assert len(actors) <= 1
            with contextlib.suppress(ProcessLookupError):  # a process that just ended: look again
                if actors:
                    os.kill(actors[0], signal.SIGKILL)
                    killed = actors[0]
        committed_before_the_kill = len(read_rows(str(output)))
        _, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, stderr.decode()[-2000:]
    assert committed_before_the_kill < count, "the kill should land mid-run"
    rows = read_rows(str(output))
    assert sorted(row["path"] for row in rows) == [f"{images}/{i:03d}.png" for i in range(count)]
    success = json.loads((output / "_SUCCESS.json").read_text())
    assert (success["images"], success["duplicate_paths"]) == (count, 0)


def test_actors_that_do_not_fit_a_local_ray_end_the_job_at_once(tmp_path, model_dir, ray_local, capsys):
    """A Ray of the job's own never grows: no wait for `--resource-timeout`, one line at once."""
    write_files(str(tmp_path / "images"), GOOD)
    output = str(tmp_path / "out")
    cpus = int(ray_local.cluster_resources()["CPU"])
    assert run(*segment_args(str(tmp_path / "images"), output, model_dir, "--cpus-per-actor", str(cpus))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not fit this Ray's" in err and "--num-cpus" in err
    assert not [path for path in storage.iter_files(output) if path.endswith(".parquet")]


def test_corrupt_weights_end_the_job_with_the_model_error_not_a_retry_hint(
    tmp_path, model_dir, ray_local, capsys
):
    """Weights only the actor reads (model.json is fine): the model's error, no "re-run" advice."""
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "weights.pt").write_bytes((broken / "weights.pt").read_bytes()[:1000])
    write_files(str(tmp_path / "images"), GOOD)
    assert run(*segment_args(str(tmp_path / "images"), str(tmp_path / "out"), str(broken))) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("segment: error: ModelError:") and "weights.pt: not a torch checkpoint" in err
    assert "re-run" not in err


def test_torchvision_weights_missing_from_the_hub_cache_exit_2_before_ray_starts(tmp_path):
    """No cached file and no network: one line naming the file and where to put it, exit 2, and
    nothing started or written (jobs.train checks its backbone weights the same way)."""
    write_files(str(tmp_path / "images"), GOOD)
    hub = tmp_path / "torch-home"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TORCH_HOME": str(hub)}
    # No network: every download goes to a closed port.
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="")
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.segment", "--input", str(tmp_path / "images"),
         "--output", str(tmp_path / "out"), "--model", "torchvision:maskrcnn_resnet50_fpn_v2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]  # no Ray start-up line, no traceback
    assert lines[0].startswith("segment: error: torchvision:maskrcnn_resnet50_fpn_v2: weights are not in")
    assert str(hub) in lines[0] and "maskrcnn_resnet50_fpn_v2_coco" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_driver_never_imports_torch(tmp_path, model_dir):
    """torch and torchvision load on the actors and tasks only: the driver's start-up stays short."""
    write_files(str(tmp_path / "images"), GOOD)
    argv = segment_args(str(tmp_path / "images"), str(tmp_path / "out"), model_dir, "--num-cpus", "2")
    script = (
        "import sys\n"
        "from jobs import segment\n"
        f"code = segment.main({argv!r})\n"
        "print(code, 'torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.split()[-3:] == ["0", "False", "False"]
    assert len(read_rows(str(tmp_path / "out"))) == len(GOOD)


def test_a_local_ray_started_by_a_job_serves_its_dashboard_on_localhost_only():
    """`ray_session` without RAY_ADDRESS starts a private Ray whose dashboard binds 127.0.0.1."""
    script = (
        "import ray\n"
        "from pipeline.cluster.session import ray_session\n"
        "with ray_session(num_cpus=1):\n"
        "    print(ray._private.worker.global_worker.node.address_info['webui_url'])\n"
        "print(ray.is_initialized())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    url, initialised = result.stdout.split()[-2:]
    assert url.startswith("127.0.0.1:")
    assert initialised == "False"


def run_job_through(proxy: FlakyS3Proxy, argv: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    """`python -m jobs.segment` with its own local Ray whose every S3 request goes through `proxy`."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "AWS_ENDPOINT_URL": proxy.url, **env_extra}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.segment", *argv, "--num-cpus", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_s3_writes_that_keep_failing_end_the_job_clearly_with_no_output(s3_bucket, s3_server, model_dir):
    images = f"{s3_bucket}/photos"
    write_files(images, {f"{i:02d}.png": png(64, 64, i) for i in range(4)})
    output = f"{s3_bucket}/out"
    with FlakyS3Proxy(s3_server, {"PUT": 1.0, "POST": 1.0}) as proxy:
        result = run_job_through(proxy, segment_args(images, output, model_dir), MRCNN_S3_MAX_ATTEMPTS="2")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("segment: error:") and "SlowDown" in last and "re-run" in last, last
    assert "Traceback" not in result.stderr  # a commit task that failed: our line only
    assert list(storage.iter_files(output)) == []


def test_boto3_sees_the_same_objects_as_the_lister(s3_bucket, s3_server):
    """`storage.iter_files` lists S3 page by page (boto3), keys only under the prefix, in order."""
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket[len("s3://") :]
    keys = [f"p/{i:04d}.png" for i in range(1005)] + ["p/dir/", "pq/other.png"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    listed = list(storage.iter_files(f"{s3_bucket}/p"))
    assert listed == [f"{s3_bucket}/p/{i:04d}.png" for i in range(1005)]
