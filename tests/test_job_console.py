"""What a job prints on its console: its own lines and progress, Ray's chatter only with --verbose.

The segmentation job runs on a few 64-80 px images with the tiny model, in this process (the
session's Ray, the output captured: no terminal) and as a command whose stdout is a terminal
(a pseudo-terminal), on a Ray of its own as a user's command starts it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jobs import segment as segment_job
from pipeline.cluster import job_log, progress, ray_compat

# Ray's lines that a job keeps off its console by default, each where Ray prints it.
SILENCED = (
    "Execution plan of Dataset",  # ray.data streaming_executor, INFO
    "Starting execution of Dataset",  # ray.data streaming_executor, INFO
    "Total Progress:",  # ray.data logging_progress, INFO, where stdout is no terminal
    "may hang forever",  # ray.data resource_manager, WARNING
    "tqdm is not installed",  # ray.experimental.tqdm_ray, on the driver
    "has constructor arguments in the object store",  # the driver's C++ core worker, stderr
    "Token authentication is enabled",  # ray.init, WARNING
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("console") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
    return str(root)


@pytest.fixture
def console(capsys):
    """capsys, with Ray Data's console handler writing into it: the handler keeps the `sys.stderr`
    of when Ray Data configured its logging (a job's terminal; here pytest's own capture)."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    handlers = [handler for handler in logging.getLogger("ray.data").handlers if handler.name == "console"]
    assert handlers
    streams = [handler.stream for handler in handlers]
    for handler in handlers:
        handler.stream = sys.stderr  # not setStream: it flushes the old one, which may be closed
    yield capsys
    for handler, stream in zip(handlers, streams, strict=True):
        handler.stream = stream


def segment_argv(images: str, output: str, model_dir: str, *extra: str) -> list[str]:
    return ["--input", images, "--output", output, "--model", model_dir, "--batch-size", "2", *extra]


def test_by_default_the_job_prints_its_progress_lines_and_none_of_rays(
    images, tmp_path, model_dir, ray_local, console, monkeypatch
):
    """In this process, whose output is captured (no terminal); what Ray's C++ code writes to fd 2
    is checked on a job of its own (below)."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1.0)
    assert segment_job.main(segment_argv(images, str(tmp_path / "out"), model_dir)) == 0
    out, err = console.readouterr()
    assert not [line for line in (out + err).splitlines() if any(text in line for text in SILENCED)]
    lines = [line for line in out.splitlines() if line.startswith("segment: progress ")]
    assert lines, out
    assert "ReadPath" in lines[-1] and "Segmenter" in lines[-1] and "decode_batch" in lines[-1]
    assert out.splitlines()[-1].startswith("segment: 4 images")


def test_verbose_shows_rays_own_lines_and_no_progress_line_of_ours(
    images, tmp_path, model_dir, ray_local, console, monkeypatch
):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1.0)
    assert segment_job.main(segment_argv(images, str(tmp_path / "out"), model_dir, "--verbose")) == 0
    out, err = console.readouterr()
    assert "Execution plan of Dataset" in err and "Total Progress:" in err
    assert "segment: progress " not in out


@pytest.mark.parametrize(("value", "verbose"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_mrcnn_verbose_in_the_environment_is_verbose(value, verbose, monkeypatch):
    monkeypatch.setenv(job_log.VERBOSE_ENV, value)
    assert job_log.verbose_requested(False) is verbose
    assert job_log.verbose_requested(True) is True


def test_on_a_terminal_the_job_shows_ray_datas_bars_and_no_ray_chatter(images, tmp_path, model_dir):
    """stdout a terminal: Ray Data draws its bars (on stderr); a fresh Ray's start-up notices, the
    C++ core worker's line about actor arguments and Ray Data's plan stay off the console."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "COLUMNS": "120"}
    env.pop("RAY_ADDRESS", None)
    env.pop(job_log.VERBOSE_ENV, None)
    argv = segment_argv(images, str(tmp_path / "out"), model_dir, "--num-cpus", "2")
    err_file = tmp_path / "stderr"
    with open(err_file, "wb") as stderr, subprocess.Popen(
        [sys.executable, "-m", "jobs.segment", *argv], env=env, stdout=follower, stderr=stderr
    ) as job:
        os.close(follower)
        out = _read_terminal(leader, job)
    err = err_file.read_text(errors="replace")
    assert job.returncode == 0, err[-3000:]
    assert "segment: 4 images" in out
    assert "row/s" in err and "Segmenter" in err  # tqdm's bars, one per operator
    console = (out + err).replace("\r", "\n").splitlines()
    assert not [line for line in console if any(text in line for text in SILENCED)]
    assert "segment: progress " not in out


def _read_terminal(fd: int, job: subprocess.Popen) -> str:
    """What `job` wrote to the terminal whose other end is `fd`, until it exits."""
    chunks = io.BytesIO()
    while True:
        readable, _, _ = select.select([fd], [], [], 0.5)
        chunk = b""
        if readable:
            with contextlib.suppress(OSError):  # EIO: no writer holds the terminal now
                chunk = os.read(fd, 1 << 16)
        if chunk:
            chunks.write(chunk)
        elif job.poll() is not None:
            break
        elif readable:
            time.sleep(0.5)
    os.close(fd)
    return chunks.getvalue().decode(errors="replace")


def test_of_the_worker_output_ray_forwards_a_quiet_driver_keeps_only_the_progress_bars():
    """Ray's own dispatcher of worker output, with a printer in place of Ray's (as
    `ray.init(log_to_driver=True)` adds it): the bars' lines reach it, nothing else does."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    printed = []
    dispatcher.add_handler(ray_compat.PRINT_HANDLER, lambda data: printed.append(data["lines"]))
    try:
        restore = ray_compat.keep_worker_output(ray_compat.is_progress_bar_line)
        bar = json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "x": 3})
        dispatcher.emit({"lines": ["a traceback line", bar], "is_err": False})
        dispatcher.emit({"lines": ["(RayTrainWorker pid=1) chatter"], "is_err": True})
        assert printed == [[bar]]
        restore()
        dispatcher.emit({"lines": ["after"], "is_err": False})
        assert printed == [[bar], ["after"]]
    finally:
        dispatcher.remove_handler(ray_compat.PRINT_HANDLER)


def test_a_driver_that_prints_no_worker_output_has_nothing_to_filter():
    assert ray_compat.keep_worker_output(ray_compat.is_progress_bar_line) is None


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("MapBatches(decode_batch)", "decode_batch"),
        ("StreamingRepartition[num_rows_per_block=8,strict=False]", "StreamingRepartition"),
        ("ReadPath", "ReadPath"),
        ("ReadPath->MapBatches(decode_batch)", "ReadPath->decode_batch"),
    ],
)
def test_progress_lines_name_the_stages_as_the_code_does(name, short):
    assert progress.short_name(name) == short
