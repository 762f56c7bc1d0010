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
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3_proxy import KINDS, FlakyS3Proxy
from test_train import GAPPED_IDS, TRAIN_FLAGS, make_dataset

from jobs import evaluate as evaluate_job
from mrcnn import s3_clients, s3_retry, storage
from mrcnn.errors import UserError
from mrcnn.model_folder import load_model
from pipeline.segment.output import part_files, read_part
from pipeline.train.metrics import LOSS_NAMES, read_history
from pipeline.train.run_folder import load_state

# Below S3's error document: the ranged GETs that a SlowDown response overflows.
SMALL_RANGE = 512
# The region of the segmentation tests' bucket.
REGION = "eu-west-1"
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

    assert s3_clients.call(read, "s3://b/k") == b"data" and answers == []
    denied = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    assert s3_clients.is_transient(flushed) and not s3_clients.is_transient(denied)


def test_a_bad_max_attempts_setting_is_one_line(s3_bucket, monkeypatch):
    monkeypatch.setenv("MRCNN_S3_MAX_ATTEMPTS", "ten")
    with pytest.raises(UserError, match="MRCNN_S3_MAX_ATTEMPTS must be a whole number"):
        storage.read_bytes(f"{s3_bucket}/x")


# --- the jobs, as users run them -----------------------------------------------------------------


def job(module: str, argv: list[str], proxy: FlakyS3Proxy, **env_extra: str) -> subprocess.Popen:
    """`python -m module argv` with its own local Ray, every S3 request through `proxy`, and no
    region variable, as on an EC2 node (each process looks its buckets' regions up)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "AWS_ENDPOINT_URL": proxy.url, **env_extra}
    for name in ("RAY_ADDRESS", "AWS_REGION", "AWS_DEFAULT_REGION"):
        env.pop(name, None)
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
    """80 images under an S3 prefix and a tiny model folder on S3, in a bucket of eu-west-1 (the
    proxy answers a request signed for another region as S3 does; moto accepts any).

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
    boto3.client("s3", endpoint_url=s3_server, region_name=REGION).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
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


def throttled_proxy(
    s3_server: str, bucket: str, share: float, seed: int, region: str | None = REGION
) -> FlakyS3Proxy:
    """The proxy of these tests: `share` of every kind of request and every small ranged GET
    throttled, and `bucket` in `region` (None: the proxy's default, moto's us-east-1)."""
    regions = {bucket[5:]: region} if region else None
    return FlakyS3Proxy(
        s3_server, rates(share), seed=seed, small_range_bytes=SMALL_RANGE, bucket_regions=regions
    )


def throttled_segment(bucket: str, s3_server: str, share: float, output: str, **env: str) -> FlakyS3Proxy:
    """One `jobs.segment` run over `bucket`'s photos with `share` of every kind of request and
    every small ranged GET throttled; returns its proxy."""
    with throttled_proxy(s3_server, bucket, share, seed=1) as proxy:
        code, _, err = finished(job("jobs.segment", segment_argv(bucket, output), proxy, **env))
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return proxy


@pytest.fixture(scope="module")
def segmented_at_20(photos, s3_server, tmp_path_factory):
    """The 20 % run, with every process appending a line per S3 client it builds to a trace."""
    output = f"{photos}/masks-20"
    trace = tmp_path_factory.mktemp("trace") / "s3-clients.jsonl"
    proxy = throttled_segment(photos, s3_server, 0.2, output, MRCNN_S3_TRACE=str(trace))
    clients = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return output, proxy, clients


def assert_every_photo_once(bucket: str, output: str) -> None:
    assert sorted(committed_paths(output)) == [f"{bucket}/photos/{i:03d}.png" for i in range(80)]
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS.json"))["images"] == 80
    filesystem, files = part_files(output)
    assert min(filesystem.get_file_info(file).size for file in files) > 16 << 10  # see `photos`


@pytest.mark.slow
def test_segment_rides_through_a_fifth_of_every_kind_of_request_throttled(photos, segmented_at_20):
    output, proxy, _ = segmented_at_20
    assert_every_photo_once(photos, output)
    assert proxy.failures > 20 and set(proxy.failed_by_kind) >= {"GET", "PUT", "HEAD"}, proxy.failed_by_kind


@pytest.mark.slow
def test_each_process_keeps_one_client_per_kind_for_the_bucket_region(segmented_at_20):
    clients = segmented_at_20[2]
    filesystems = Counter(client["pid"] for client in clients if client["kind"] == "pyarrow")
    boto3_clients = Counter(client["pid"] for client in clients if client["kind"] == "boto3")
    # The driver, the lister, decode and commit tasks, the inference actor: several processes...
    assert len(set(filesystems) | set(boto3_clients)) >= 3, clients
    # ... each with at most one native filesystem (listings, existence checks) for all its work
    # (80 images, 3 parts, the model), and at most a boto3 client to ask the bucket's region and
    # one in that region for the whole-object reads and writes and the listing.
    assert max(filesystems.values()) == 1, filesystems
    assert max(boto3_clients.values()) <= 2, boto3_clients
    assert {c["region"] for c in clients if c["kind"] == "pyarrow"} == {REGION}


@pytest.mark.slow
def test_connections_are_reused_across_objects(segmented_at_20):
    proxy = segmented_at_20[1]
    objects = {(method, path.split("?")[0]) for method, path, _, _ in proxy.log if method in ("GET", "PUT")}
    assert len(objects) >= 80
    # Keep-alive connections, a handful per process, not one per object.
    assert proxy.connections < len(objects) / 2, (proxy.connections, len(objects))


@pytest.mark.slow
def test_segment_rides_through_a_twentieth_of_every_kind_of_request_throttled(photos, s3_server):
    output = f"{photos}/masks-5"
    proxy = throttled_segment(photos, s3_server, 0.05, output)
    assert_every_photo_once(photos, output)
    assert proxy.failures > 0


@pytest.mark.slow
def test_segment_killed_mid_run_under_throttling_resumes_with_every_row_once(photos, s3_server):
    output = f"{photos}/masks-killed"
    with throttled_proxy(s3_server, photos, 0.2, seed=2) as proxy:
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
    output = segmented_at_20[0]
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
    with throttled_proxy(s3_server, photos, 0.2, seed=4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # As on an EC2 node: no region set, the bucket's looked up (this process signs for it).
        monkeypatch.delenv("AWS_REGION", raising=False)
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        throttled = f"{photos}/eval-throttled.json"
        assert evaluate_job.main([*argv, "--json", throttled]) == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert json.loads(storage.read_bytes(throttled)) == json.loads(storage.read_bytes(direct))
    assert proxy.failures > 0
    assert "80 of 80 annotated images have a row" in capsys.readouterr().out


@pytest.mark.slow
def test_training_on_s3_rides_through_throttling_exports_a_detecting_model_and_resumes(s3_server, tmp_path):
    """Two workers, data, validation, checkpoints, metrics and the model on S3: the first run with
    a fifth of every request throttled, the resumed run (one more epoch) with a twentieth."""
    import boto3

    bucket = f"train-faults-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    annotations, images = make_dataset(f"s3://{bucket}/shapes")
    output = f"s3://{bucket}/runs/tiny"
    argv = ["--train-annotations", annotations, "--train-images", images, "--output", output,
            "--num-cpus", "2", *TRAIN_FLAGS]  # fmt: skip
    validation = ["--val-annotations", annotations, "--val-images", images]
    with throttled_proxy(s3_server, f"s3://{bucket}", 0.2, seed=5, region=None) as proxy:
        code, out, err = finished(job("jobs.train", [*argv, *validation, "--epochs", "1"], proxy))
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and proxy.failures > 0
    history = read_history(f"{output}/metrics.jsonl")
    assert [e["epoch"] for e in history] == [1]
    epoch = history[0]
    for key in ("loss", *LOSS_NAMES, "lr", "images_per_second"):
        assert np.isfinite(epoch[key]), key
    assert epoch["images"] == 8  # 2 workers x 4 images: every image, none twice
    assert set(epoch["segm"]) >= {"AP", "AP50", "AP75"} and set(epoch["bbox"]) >= {"AP"}
    assert load_state_from(f"{output}/checkpoints/epoch-0001")["epoch"] == 1
    assert_detecting_model(f"{output}/model")

    with throttled_proxy(s3_server, f"s3://{bucket}", 0.05, seed=6, region=None) as proxy:
        code, out, err = finished(job("jobs.train", [*argv, "--epochs", "2"], proxy))
    assert code == 0, err[-3000:]
    assert f"resuming from checkpoint {output}/checkpoints/epoch-0001" in out
    assert [e["epoch"] for e in read_history(f"{output}/metrics.jsonl")] == [1, 2]


def load_state_from(checkpoint_uri: str) -> dict:
    """A checkpoint's training state, copied locally and loaded with `weights_only=True`."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "training_state.pt"), "wb") as file:
            file.write(storage.read_bytes(f"{checkpoint_uri}/training_state.pt"))
        state = load_state(folder)
    assert set(state) >= {"model", "optimizer", "scheduler", "history"}
    return state


def assert_detecting_model(model_uri: str) -> None:
    """The exported folder loads strictly into the model its spec names, and the model detects."""
    import torch

    model, spec = load_model(model_uri)
    assert [c.id for c in spec.categories] == sorted(GAPPED_IDS.values())
    assert spec.preset == "tiny" and spec.num_classes == 5 and (spec.min_size, spec.max_size) == (64, 96)
    weights = torch.load(io.BytesIO(storage.read_bytes(f"{model_uri}/weights.pt")), weights_only=True)
    assert set(weights) == set(model.state_dict())
    model.score_threshold = 0.0
    with torch.inference_mode():
        (prediction,) = model([torch.rand(3, 64, 64)])
    count = len(prediction["boxes"])
    assert prediction["boxes"].shape == (count, 4) and prediction["scores"].shape == (count,)
    assert prediction["masks"].shape == (count, 1, 64, 64)
    assert set(prediction["labels"].tolist()) <= {1, 2, 3, 4}
