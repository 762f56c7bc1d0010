"""S3 as it behaves at scale: throttled (`503 SlowDown` with S3's own XML body) on every kind of
request, connections reset, and the small ranged GETs whose error body the AWS SDK misreports as
a non-retryable `Failed to flush response stream`.

The proxy of `s3_proxy` sits between every client and moto. The storage tests run in this process;
the job tests run `jobs.segment`, `jobs.evaluate` and `jobs.train` as users do, every process of
theirs (driver, Ray tasks and actors, training workers) going through the proxy.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3_proxy import KINDS, FlakyS3Proxy

from jobs import evaluate as evaluate_job
from mrcnn import s3_retry, storage
from mrcnn.shapes import generate_shapes
from pipeline.metrics import read_history
from pipeline.output import part_files, read_part

# Below S3's error document: the ranged GETs that a SlowDown response overflows.
SMALL_RANGE = 512
EVERY_KIND = dict.fromkeys(KINDS, 1.0)


def rates(share: float) -> dict[str, float]:
    return {kind: share for kind in KINDS}


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def parquet_with_a_null_column(rows: int) -> bytes:
    """A Parquet file whose `error` column is all null: its column chunk is a few dozen bytes."""
    table = pa.table({"path": [f"p{i:07d}" for i in range(rows)], "error": pa.nulls(rows, pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")
    return buffer.getvalue()


# --- storage, in this process ------------------------------------------------------------------


def test_small_ranged_reads_are_never_asked_so_throttling_them_fails_nothing(
    s3_bucket, s3_server, monkeypatch
):
    """Every ranged GET under 512 bytes is answered 503: reads of a small object, of a Parquet
    footer and of an all-null column chunk (small file and one past the whole-object limit)."""
    small = parquet_with_a_null_column(100)
    large = parquet_with_a_null_column(1_200_000)
    assert len(large) > s3_retry.WHOLE_OBJECT_BYTES
    storage.write_bytes(f"{s3_bucket}/small.parquet", small)
    storage.write_bytes(f"{s3_bucket}/large.parquet", large)
    storage.write_bytes(f"{s3_bucket}/_JOB.json", b'{"model": "m"}')
    with FlakyS3Proxy(s3_server, small_range_bytes=SMALL_RANGE) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert json.loads(storage.read_bytes(f"{s3_bucket}/_JOB.json")) == {"model": "m"}
        assert list(storage.read_chunks(f"{s3_bucket}/_JOB.json", chunk_bytes=4))[0] == b'{"mo'
        filesystem, _ = storage.resolve(s3_bucket)
        for name, rows in (("small", 100), ("large", 1_200_000)):
            table = pq.read_table(f"{s3_bucket[5:]}/{name}.parquet", filesystem=filesystem, columns=["error"])
            assert table.num_rows == rows and table.column("error").null_count == rows
            # Row group metadata and a ranged read of the footer's last bytes, as scanners do.
            with filesystem.open_input_file(f"{s3_bucket[5:]}/{name}.parquet") as file:
                assert pq.ParquetFile(file).metadata.num_rows == rows
    assert proxy.by_kind["GET"] + proxy.by_kind["GET_RANGE"] > 0
    assert proxy.failed_by_kind["GET_RANGE"] == 0, proxy.log[-5:]


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_throttled_and_reset_requests_of_every_kind_are_retried(s3_bucket, s3_server, monkeypatch, share):
    data = {f"{s3_bucket}/dir/{i:04d}.bin": os.urandom(100 + i) for i in range(40)}
    before = s3_retry.retries_done()
    with FlakyS3Proxy(s3_server, rates(share), seed=7, reset_rates=rates(share / 4)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        for uri, payload in data.items():
            storage.write_bytes(uri, payload)
        assert {uri: storage.read_bytes(uri) for uri in data} == data
        assert all(storage.exists(uri) for uri in data)
        assert list(storage.iter_files(f"{s3_bucket}/dir")) == sorted(data)
        storage.delete(next(iter(data)))
        assert not storage.exists(next(iter(data)))
    assert proxy.failures + proxy.resets > 0
    assert s3_retry.retries_done() > before  # boto3's requests, which this project retries itself


def test_a_listing_of_many_pages_survives_throttled_pages(s3_bucket, s3_server, monkeypatch):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"p/{i:05d}.png" for i in range(2500)]
    for key in keys:
        client.put_object(Bucket=s3_bucket[5:], Key=key, Body=b"")
    with FlakyS3Proxy(s3_server, {"LIST": 0.5}, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        listed = list(storage.iter_files(f"{s3_bucket}/p"))
    assert listed == [f"{s3_bucket}/{key}" for key in keys]
    assert proxy.failed_by_kind["LIST"] > 0


def test_a_store_that_keeps_failing_ends_after_max_attempts_with_one_line(s3_bucket, s3_server, monkeypatch):
    uri = f"{s3_bucket}/x.json"
    storage.write_bytes(uri, b"{}")
    monkeypatch.setenv("MRCNN_S3_MAX_ATTEMPTS", "3")
    with FlakyS3Proxy(s3_server, EVERY_KIND) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(storage.StorageError) as raised:
            storage.read_bytes(uri)
    assert "\n" not in str(raised.value) and uri in str(raised.value) and "SlowDown" in str(raised.value)
    assert proxy.by_kind["GET"] == 3  # exactly MRCNN_S3_MAX_ATTEMPTS, then the error


def test_the_sdk_misreported_throttle_is_retried_and_others_are_not():
    """The one error pyarrow's SDK reports as final for a throttled small range is retried."""
    flushed = OSError(
        "AWS Error INTERNAL_FAILURE during GetObject operation: "
        "Failed to flush response stream (eof: 0, bad: 1)"
    )
    answers = [flushed, flushed, b"data"]

    def read():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert s3_retry.call(read, "s3://b/k") == b"data" and answers == []
    denied = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    assert s3_retry.is_transient(flushed) and not s3_retry.is_transient(denied)


def test_a_bad_max_attempts_setting_is_one_line(s3_bucket, monkeypatch):
    monkeypatch.setenv("MRCNN_S3_MAX_ATTEMPTS", "ten")
    with pytest.raises(storage.StorageError, match="MRCNN_S3_MAX_ATTEMPTS must be a whole number"):
        storage.read_bytes(f"{s3_bucket}/x")


# --- the jobs, as users run them -----------------------------------------------------------------


def job(module: str, argv: list[str], proxy: FlakyS3Proxy, **env_extra: str) -> subprocess.Popen:
    """`python -m module argv` with its own local Ray, every S3 request through `proxy`."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "AWS_ENDPOINT_URL": proxy.url, **env_extra}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out, err


def committed_paths(output: str) -> list[str]:
    """Every row's path, read without the proxy (moto directly)."""
    filesystem, files = part_files(output)
    return [path for file in files for path in read_part(filesystem, file, ["path"]).column(0).to_pylist()]


@pytest.fixture(scope="module")
def photos(s3_server, tmp_path_factory):
    """80 images under an S3 prefix and a tiny model folder on S3.

    Images of 160 px and a low score threshold give the random model many masks per image, so a
    part file of 30 rows is tens of KB: too large for the footer read to cover its column chunks,
    and the all-null `error` column's chunk is a ranged GET of its own, of a few bytes (the read
    that failed the job before the retry layer).
    """
    import boto3
    import torch

    from mrcnn.categories import Category
    from mrcnn.model import build_model
    from mrcnn.model_folder import save_model_folder, spec_for

    bucket = f"faults-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    for i in range(80):
        storage.write_bytes(f"s3://{bucket}/photos/{i:03d}.png", png(i, size=160))
    torch.manual_seed(0)
    model = build_model("tiny", 3)
    save_model_folder(model, spec_for(model, (Category(1, "a"), Category(2, "b"))), f"s3://{bucket}/model")
    return f"s3://{bucket}"


def segment_argv(bucket: str, output: str) -> list[str]:
    return [
        "--input", f"{bucket}/photos", "--output", output, "--model", f"{bucket}/model",
        "--batch-size", "2", "--rows-per-file", "30", "--score-threshold", "0.05", "--num-cpus", "3",
    ]  # fmt: skip


def throttled_segment(bucket: str, s3_server: str, share: float, output: str) -> FlakyS3Proxy:
    """One `jobs.segment` run over `bucket`'s photos with `share` of every kind of request and
    every small ranged GET throttled; returns its proxy."""
    with FlakyS3Proxy(s3_server, rates(share), seed=1, small_range_bytes=SMALL_RANGE) as proxy:
        code, _, err = finished(job("jobs.segment", segment_argv(bucket, output), proxy))
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return proxy


@pytest.fixture(scope="module")
def segmented_at_20(photos, s3_server):
    output = f"{photos}/masks-20"
    return output, throttled_segment(photos, s3_server, 0.2, output)


def assert_every_photo_once(bucket: str, output: str) -> None:
    assert sorted(committed_paths(output)) == [f"{bucket}/photos/{i:03d}.png" for i in range(80)]
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS.json"))["images"] == 80
    filesystem, files = part_files(output)
    assert min(filesystem.get_file_info(file).size for file in files) > 16 << 10  # see `photos`


@pytest.mark.slow
def test_segment_rides_through_a_fifth_of_every_kind_of_request_throttled(photos, segmented_at_20):
    output, proxy = segmented_at_20
    assert_every_photo_once(photos, output)
    assert proxy.failures > 20 and set(proxy.failed_by_kind) >= {"GET", "PUT", "HEAD"}, proxy.failed_by_kind


@pytest.mark.slow
def test_segment_rides_through_a_twentieth_of_every_kind_of_request_throttled(photos, s3_server):
    output = f"{photos}/masks-5"
    proxy = throttled_segment(photos, s3_server, 0.05, output)
    assert_every_photo_once(photos, output)
    assert proxy.failures > 0


@pytest.mark.slow
def test_segment_killed_mid_run_under_throttling_resumes_with_every_row_once(photos, s3_server):
    output = f"{photos}/masks-killed"
    with FlakyS3Proxy(s3_server, rates(0.2), seed=2, small_range_bytes=SMALL_RANGE) as proxy:
        driver = job("jobs.segment", segment_argv(photos, output), proxy)
        try:
            deadline = time.monotonic() + 300
            while not part_files(output)[1]:
                assert driver.poll() is None, driver.communicate()[1][-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        done_before = len(committed_paths(output))
        code, _, err = finished(job("jobs.segment", segment_argv(photos, output), proxy))
    assert 0 < done_before < 80
    assert code == 0, err[-3000:]
    paths = committed_paths(output)
    assert sorted(paths) == [f"{photos}/photos/{i:03d}.png" for i in range(80)]  # once each
    success = json.loads(storage.read_bytes(f"{output}/_SUCCESS.json"))
    assert success["images"] == 80 and success["new_images"] <= 80 - done_before
    assert proxy.failures > 0


@pytest.mark.slow
def test_evaluate_reads_predictions_through_throttling(
    photos, segmented_at_20, s3_server, monkeypatch, capsys
):
    """jobs.evaluate over the output of a throttled run, itself throttled: the same AP as direct."""
    output, _ = segmented_at_20
    annotations = f"{photos}/annotations.json"
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": 160, "height": 160} for i in range(80)]
    ground_truth = {
        "images": images,
        "annotations": [
            {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [8, 8, 24, 24], "area": 576,
             "iscrowd": 0, "segmentation": [[8, 8, 32, 8, 32, 32, 8, 32]]}
            for i in range(80)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }  # fmt: skip
    storage.write_bytes(annotations, json.dumps(ground_truth).encode())
    argv = ["--predictions", output, "--annotations", annotations, "--exif-orientation", "apply"]
    direct = f"{photos}/eval-direct.json"
    assert evaluate_job.main([*argv, "--json", direct]) == 0
    with FlakyS3Proxy(s3_server, rates(0.2), seed=4, small_range_bytes=SMALL_RANGE) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        throttled = f"{photos}/eval-throttled.json"
        assert evaluate_job.main([*argv, "--json", throttled]) == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert json.loads(storage.read_bytes(throttled)) == json.loads(storage.read_bytes(direct))
    assert proxy.failures > 0
    assert "80 of 80 annotated images have a row" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.05, 0.2])
def test_train_with_s3_data_and_checkpoints_rides_through_throttling(s3_server, tmp_path, share):
    import boto3

    bucket = f"train-faults-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    data = generate_shapes(f"s3://{bucket}/shapes", 16, seed=1, size=64)
    output = f"s3://{bucket}/run"
    argv = [
        "--train-annotations", data.annotations_uri, "--train-images", data.images_root,
        "--output", output, "--preset", "tiny", "--num-workers", "1", "--epochs", "1",
        "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1", "--num-cpus", "2",
    ]  # fmt: skip
    with FlakyS3Proxy(s3_server, rates(share), seed=5, small_range_bytes=SMALL_RANGE) as proxy:
        code, out, err = finished(job("jobs.train", argv, proxy))
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
        if share == 0.2:
            # Re-run on the same output: reads the run's record, its checkpoints and metrics.
            again, out_again, err_again = finished(job("jobs.train", argv, proxy))
            assert again == 0, err_again[-3000:]
            assert "already complete" in out_again and "Traceback" not in err_again
    assert [record["epoch"] for record in read_history(f"{output}/metrics.jsonl")] == [1]
    assert storage.exists(f"{output}/model/model.json")
    assert proxy.failures > 0
