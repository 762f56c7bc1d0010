"""Credentials from the environment never reach a job's output, its summary or its logs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pyarrow.fs import FileSelector

from mrcnn import build_model, storage
from mrcnn.categories import Category
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.shapes import generate_shapes

KEY_ID = "SENTINELKEYID0042"
SECRET = "sentinel-secret-Zq8x1N3p"
SESSION = "sentinel-session-token-77"


@pytest.mark.slow
def test_segmentation_on_s3_leaks_no_credentials(tmp_path, s3_bucket):
    data = f"{s3_bucket}/shapes"
    generate_shapes(data, 3, seed=4, size=64)
    model = build_model("tiny", 5)
    model_dir = str(tmp_path / "model")
    save_model_folder(model, spec_for(model, [Category(i, f"c{i}") for i in range(1, 5)]), model_dir)
    # A short path: Ray's Unix socket paths under it must stay under ~107 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="sec-", dir="/tmp"))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": SESSION,
        "RAY_TMPDIR": str(ray_tmp),
    }
    env.pop("RAY_ADDRESS", None)
    output = f"{s3_bucket}/out"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.segment", "--input", f"{data}/images", "--output", output,
         "--model", model_dir, "--gpus-per-actor", "0", "--score-threshold", "0.05", "--num-cpus", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    filesystem, prefix = storage.resolve(output)
    written = {
        info.base_name: storage.read_bytes(storage.to_uri(filesystem, info.path))
        for info in filesystem.get_file_info(FileSelector(prefix, recursive=True))
        if info.is_file
    }
    assert "_SUCCESS.json" in written and any(name.endswith(".parquet") for name in written)
    logs = [path.read_bytes() for path in ray_tmp.rglob("*") if path.is_file() and _is_log(path)]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert logs, "the job's Ray wrote its logs under RAY_TMPDIR"
    for blob in [result.stdout.encode(), result.stderr.encode(), *written.values(), *logs]:
        for secret in (KEY_ID, SECRET, SESSION):
            assert secret.encode() not in blob


def _is_log(path: Path) -> bool:
    return path.suffix in {".log", ".out", ".err", ".txt", ".json"} and path.stat().st_size < 50_000_000
