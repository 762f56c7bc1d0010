"""Ray Data's own checkpointing against the project's done set (issue 25, point 6): the same resume
of `--inputs` paths with `--done` already done, and a driver killed mid-run then re-run.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/ray_checkpoint.py --workdir /tmp/ray-checkpoint \\
        [--inputs 200000] [--done 100000] [--batch-size 4] [--kill-at 0.5] [--cpus 4]

Both arms run one pipeline on a local Ray of `--cpus` CPUs, each driver in a process of its own
(`PYTHONPATH` holds the repository and `benchmarks/`, so that the workers import the same code):
a `.txt` manifest of `--inputs` paths -> `pipeline.segment.listing.PathDatasource` (one read task,
no CPU) -> blocks of `--batch-size` paths -> a stand-in for decode and inference (a task that turns
each path into the output row of a 32x32 image without detections, `scale.fake_rows`; no image is
read, no model runs) -> one Parquet file per 256 rows, with the job's block size
(`pipeline.segment.job.TARGET_MAX_BLOCK_SIZE`), `BoundedBlockStats` and `CutAhead`. Only the
resume and the commit differ:
(a) done set: the first `--done` paths committed as `part-<sha1>.parquet` files of 256 rows
    (`scale.write_done`, as a killed run leaves them); the driver reads `committed_path_hashes`,
    puts it in the object store, the read task drops those inputs, `output.commit_part` commits
    every 256 rows, and at the end `output.summarize` (and `remove_duplicates` when a path has
    two rows), the final check of `jobs.segment`.
(b) Ray: `DataContext.checkpoint_config = CheckpointConfig(id_column="path", checkpoint_path=...,
    delete_checkpoint_on_success=False)` and the pipeline ending in `write_parquet(
    min_rows_per_file=256)`; its checkpoint of `--done` ids is Ray's own, made once by the same
    pipeline run to its end over the first `--done` inputs of the manifest (`InputSpec.limit`).
Each run starts from a copy of its arm's state. Measured per run: the driver's peak RSS (VmHWM
of its own process; sampled from /proc for a killed one), the peak RSS of its Ray workers by role
(the read task, the checkpoint filter actors) sampled every 0.25 s, seconds from the driver's
start to its first new commit ((a) a new part file; (b) a new committed checkpoint file, the
point of Ray's two-phase commit) and in all. Exactly-once: from the same state, the driver is
SIGKILLed once `--kill-at` of its new commits are there, the processes of its Ray are left to
end on their own (killed by pid after 30 s), the same command runs again to its end, and the rows
per path of the whole output are counted (every readable `*.parquet` under it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from scale import fake_rows, manifest_path, peak_mib, write_done, write_manifest

from jobs.cli import OneLineParser, bounded
from pipeline.segment import output

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS_PER_FILE = 256
PENDING = ".pending.parquet"
STRAY_WAIT_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ray_checkpoint.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ray-checkpoint")
    parser.add_argument("--inputs", type=bounded(int, 2 * ROWS_PER_FILE), default=200_000)
    parser.add_argument("--done", type=bounded(int, ROWS_PER_FILE), default=100_000)
    parser.add_argument("--batch-size", type=bounded(int, 1), default=4)
    parser.add_argument("--kill-at", type=bounded(float, 0.0, 1.0, above=True), default=0.5)
    parser.add_argument("--cpus", type=bounded(int, 2), default=4)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser


# --- the driver, in a process of its own ---------------------------------------------------------


def stand_in(batch: pa.Table) -> pa.Table:
    """Decode and inference stand-in: the output row of each path (32x32, no detections)."""
    return fake_rows(batch.column("path").to_pylist())


def commit(batch: pa.Table, output_uri: str) -> pa.Table:
    output.commit_part(batch.cast(output.SCHEMA), output_uri)
    return pa.table({"images": [batch.num_rows]})


def paths_dataset(manifest: str, limit: int | None, done, batch_size: int):
    import ray

    from pipeline.cluster.ray_compat import BoundedBlockStats, add_backpressure_policy
    from pipeline.segment.inputs import check_input
    from pipeline.segment.job import TARGET_MAX_BLOCK_SIZE, CutAhead
    from pipeline.segment.listing import PathDatasource

    context = ray.data.DataContext.get_current()
    context.target_max_block_size = TARGET_MAX_BLOCK_SIZE
    context.enable_progress_bars = False
    context.custom_execution_callback_classes = [BoundedBlockStats]
    add_backpressure_policy(context, CutAhead)
    source = PathDatasource(check_input(manifest, limit), rows_per_block=batch_size, done=done)
    dataset = ray.data.read_datasource(source, override_num_blocks=1, num_cpus=0)
    dataset = dataset.repartition(target_num_rows_per_block=batch_size)
    return dataset.map_batches(stand_in, batch_format="pyarrow")


def start_ray(cpus: int) -> float:
    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def child_done_set(manifest: str, out: str, batch_size: str, cpus: str) -> dict:
    import numpy as np

    ray_s = start_ray(int(cpus))
    import ray

    started = time.perf_counter()
    output.clear_stale_state(out)
    hashes = output.committed_path_hashes(out)
    done = ray.put(hashes) if hashes.size else None
    done_s = time.perf_counter() - started
    dataset = paths_dataset(manifest, None, done, int(batch_size)).map_batches(
        commit, batch_size=ROWS_PER_FILE, fn_kwargs={"output_uri": out}, batch_format="pyarrow"
    )
    rows = sum(int(np.sum(batch["images"])) for batch in dataset.iter_batches(batch_size=None))
    summary = output.summarize(out)
    repaired = output.remove_duplicates(out, summary.duplicate_paths) if summary.duplicate_paths else 0
    return {"ray_s": ray_s, "resume_s": done_s, "done_ids": int(hashes.size),
            "done_bytes": int(hashes.nbytes), "new_rows": rows, "repaired": repaired,
            "driver_mib": peak_mib()}  # fmt: skip


class CheckpointLog(logging.Handler):
    """Keeps what Ray logs when it has loaded a checkpoint (seconds, size of the ids array)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.loaded: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Checkpoint loaded") and len(record.args or ()) >= 3:
            self.loaded = {"seconds": float(record.args[1]), "bytes": int(record.args[2])}


def child_ray(manifest: str, out: str, checkpoint: str, batch_size: str, cpus: str, limit: str) -> dict:
    ray_s = start_ray(int(cpus))
    import ray
    from ray.data.checkpoint import CheckpointConfig

    log = CheckpointLog()
    logging.getLogger("ray.data.checkpoint.checkpoint_filter").addHandler(log)
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = CheckpointConfig(
        id_column="path", checkpoint_path=checkpoint, delete_checkpoint_on_success=False
    )
    dataset = paths_dataset(manifest, int(limit) or None, None, int(batch_size))
    dataset.write_parquet(out, min_rows_per_file=ROWS_PER_FILE, compression="zstd")
    return {"ray_s": ray_s, "resume_s": log.loaded.get("seconds"), "done_bytes": log.loaded.get("bytes"),
            "pipeline_s": time.perf_counter() - started, "driver_mib": peak_mib()}  # fmt: skip


CHILDREN = {"done-set": child_done_set, "ray": child_ray}


# --- the parent: runs, watches and kills drivers -------------------------------------------------


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS")).split()[1])
    except (OSError, StopIteration):
        return 0


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Tree:
    """The driver's process tree, sampled from /proc: peak RSS per process and its role."""

    def __init__(self, driver: int):
        self.driver = driver
        self.known: dict[tuple[int, int], dict] = {}  # (pid, start time) -> {"role", "peak_kib"}
        self.total_kib = 0

    def sample(self) -> None:
        parents: dict[int, list[int]] = {}
        starts: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (stat := proc_stat(int(name))):
                parents.setdefault(stat[0], []).append(int(name))
                starts[int(name)] = stat[1]
        roots = [self.driver] + [pid for pid, start in self.known if starts.get(pid) == start]
        found, stack = set(), list(roots)
        while stack:
            pid = stack.pop()
            if pid in starts and pid not in found:
                found.add(pid)
                stack.extend(parents.get(pid, []))
        total = 0
        for pid in found:
            entry = self.known.setdefault((pid, starts[pid]), {"role": "ray", "peak_kib": 0})
            rss = rss_kib(pid)
            total += rss
            entry["peak_kib"] = max(entry["peak_kib"], rss)
            name = title(pid)
            if pid == self.driver:
                entry["role"] = "driver"
            elif "CheckpointFilter" in name:
                entry["role"] = "filter"
            elif "ReadPath" in name and entry["role"] != "filter":
                entry["role"] = "read"
            elif name.startswith("ray::") and entry["role"] == "ray":
                entry["role"] = "worker"
        self.total_kib = max(self.total_kib, total)

    def alive(self) -> list[int]:
        return [
            pid for pid, start in self.known if pid != self.driver and (proc_stat(pid) or (0, -1))[1] == start
        ]

    def peak(self, role: str) -> tuple[float, int]:
        """The largest peak RSS (MiB) among processes of `role`, and how many there were."""
        peaks = [entry["peak_kib"] for entry in self.known.values() if entry["role"] == role]
        return (max(peaks) / 1024 if peaks else 0.0), len(peaks)


def committed(arm: str, out: str, checkpoint: str) -> set[str]:
    """The committed files: (a) part files of the output; (b) committed checkpoint files."""
    if arm == "done-set":
        folder, keep = out, lambda name: name.startswith(output.PART_PREFIX) and name.endswith(".parquet")
    else:
        folder, keep = checkpoint, lambda name: name.endswith(".parquet") and not name.endswith(PENDING)
    return {name for name in os.listdir(folder) if keep(name)} if os.path.isdir(folder) else set()


def run_driver(arm: str, args: list[str], out: str, checkpoint: str, kill_after: int | None = None) -> dict:
    """One driver run of `arm`: its result, peaks by role, seconds to the first new commit and in
    all; SIGKILLed (the driver only) at `kill_after` new commits, then its Ray left to end."""
    before = committed(arm, out, checkpoint)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.path.join(HERE, "benchmarks")])}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, os.path.abspath(__file__), "--child", arm, *args]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    logs = os.path.join(os.path.dirname(out), f"driver-{time.time_ns()}")
    started = time.perf_counter()
    with open(logs + ".out", "w") as stdout, open(logs + ".err", "w") as stderr:
        driver = subprocess.Popen(
            command, env=env, cwd=HERE, stdout=stdout, stderr=stderr, start_new_session=True
        )
    tree = Tree(driver.pid)
    first, killed = None, None
    while driver.poll() is None:
        tree.sample()
        new = len(committed(arm, out, checkpoint) - before)
        if first is None and new:
            first = time.perf_counter() - started
        if kill_after is not None and new >= kill_after:
            killed = {"new_commits": new, "at_s": time.perf_counter() - started}
            killed.update(orphans(arm, out, checkpoint))
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            break
        time.sleep(0.25)
    seconds = time.perf_counter() - started
    result = {"first_commit_s": first, "seconds": seconds, "tree_mib": tree.total_kib / 1024}
    for role in ("driver", "read", "filter"):
        result[f"{role}_peak_mib"], result[f"{role}_count"] = tree.peak(role)
    if killed:
        waited = time.perf_counter()
        while (strays := tree.alive()) and time.perf_counter() - waited < STRAY_WAIT_S:
            time.sleep(0.25)
        killed["strays_lived_s"] = time.perf_counter() - waited
        killed["strays"] = sorted(title(pid).split(" ")[0] for pid in strays)
        for pid in strays:
            os.kill(pid, signal.SIGKILL)
        killed["strays_killed"] = len(strays)
        return {**result, "killed": killed}
    if driver.returncode != 0:
        with open(logs + ".err") as stderr:
            raise SystemExit(f"{arm} driver failed ({logs}.err):\n{stderr.read()[-3000:]}")
    with open(logs + ".out") as stdout:  # Ray's log deduplication can print after the result
        line = [line for line in stdout.read().splitlines() if line.startswith("{")][-1]
    return {**result, **json.loads(line)}


def orphans(arm: str, out: str, checkpoint: str) -> dict:
    """At the kill: temporaries (a) or pending checkpoints (b), i.e. writes not yet committed."""
    if arm == "done-set":
        return {"uncommitted": sum(name.endswith(".tmp") for name in os.listdir(out))}
    return {"uncommitted": sum(name.endswith(PENDING) for name in os.listdir(checkpoint))}


def count_rows(out: str, inputs: int) -> dict:
    """Rows per path over every readable `*.parquet` directly under `out` (hidden names skipped)."""
    import pyarrow.compute as pc

    columns, unreadable, files = [], 0, 0
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet") and not name.startswith((".", "_")):
            files += 1
            try:
                columns.append(pq.read_table(os.path.join(out, name), columns=["path"]).column(0))
            except (OSError, pa.ArrowException):
                unreadable += 1
    paths = pa.chunked_array([chunk for column in columns for chunk in column.chunks], pa.string())
    counts = pc.value_counts(paths).field("counts")
    twice = int(pc.sum(pc.greater(counts, 1)).as_py() or 0)
    return {"rows": len(paths), "distinct": len(counts), "twice": twice, "missing": inputs - len(counts),
            "files": files, "unreadable": unreadable}  # fmt: skip


def fresh_copy(base: str, run: str) -> None:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)


def prepare(workdir: str, inputs: int, done: int, batch_size: int, cpus: int) -> tuple[str, dict]:
    """The manifest, (a)'s committed rows and (b)'s checkpointed output, each made once."""
    manifest = os.path.join(workdir, f"manifest-{inputs}.txt")
    write_manifest(manifest, inputs)
    write_done(os.path.join(workdir, f"done-set-{done}", "out"), (manifest_path(i) for i in range(done)))
    base = os.path.join(workdir, f"ray-{done}-b{batch_size}")
    made = os.path.join(base, "made.json")
    if not os.path.exists(made):
        shutil.rmtree(base, ignore_errors=True)
        out, checkpoint = os.path.join(base, "out"), os.path.join(base, "checkpoint")
        args = [manifest, out, checkpoint, str(batch_size), str(cpus), str(done)]
        result = run_driver("ray", args, out, checkpoint)
        with open(made, "w") as file:
            json.dump(result, file)
    with open(made) as file:
        return manifest, json.load(file)


def arm_args(arm: str, manifest: str, run: str, batch_size: int, cpus: int) -> tuple[list[str], str, str]:
    out, checkpoint = os.path.join(run, "out"), os.path.join(run, "checkpoint")
    if arm == "done-set":
        return [manifest, out, str(batch_size), str(cpus)], out, checkpoint
    return [manifest, out, checkpoint, str(batch_size), str(cpus), "0"], out, checkpoint


def measure(workdir: str, arm: str, manifest: str, args: argparse.Namespace) -> dict:
    base = os.path.join(
        workdir, f"done-set-{args.done}" if arm == "done-set" else f"ray-{args.done}-b{args.batch_size}"
    )
    run = os.path.join(workdir, f"run-{arm}")
    fresh_copy(base, run)
    command, out, checkpoint = arm_args(arm, manifest, run, args.batch_size, args.cpus)
    resume = run_driver(arm, command, out, checkpoint)
    resume["output"] = count_rows(out, args.inputs)
    fresh_copy(base, run)
    remaining_files = (args.inputs - args.done) // ROWS_PER_FILE
    kill = run_driver(arm, command, out, checkpoint, kill_after=max(1, int(args.kill_at * remaining_files)))
    rerun = run_driver(arm, command, out, checkpoint)
    rerun["output"] = count_rows(out, args.inputs)
    return {"resume": resume, "kill": kill["killed"], "rerun": rerun}


def cell(value, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def counts(output_counts: dict) -> str:
    return "{rows:,} / {distinct:,} / {twice:,} / {missing:,}".format(**output_counts)


def of_resume(key: str, spec: str, unit: str):
    return lambda result: cell(result["resume"][key], spec, unit)


def kill_line(kill: dict) -> str:
    strays = (
        f" ({kill['strays_killed']} killed: {', '.join(kill['strays'])})" if kill["strays_killed"] else ""
    )
    return f"{kill['new_commits']}, {kill['uncommitted']}, {kill['strays_lived_s']:.1f} s{strays}"


def report(results: dict, made: dict, args: argparse.Namespace) -> None:
    a, b = results["done-set"], results["ray"]
    remaining = args.inputs - args.done
    print(f"\n{args.inputs:,} inputs, {args.done:,} done, batch {args.batch_size}, Ray of {args.cpus} CPUs")
    print(f"(b)'s checkpoint made by its pipeline over the first {args.done:,}: {made['seconds']:.0f} s")
    rows = [
        ("driver peak RSS (VmHWM)", of_resume("driver_mib", ".0f", " MiB")),
        ("read task peak RSS", of_resume("read_peak_mib", ".0f", " MiB")),
        ("checkpoint filter actors: count", lambda r: str(r["resume"]["filter_count"])),
        ("checkpoint filter actors: largest peak RSS", of_resume("filter_peak_mib", ".0f", " MiB")),
        ("whole process tree, peak RSS", of_resume("tree_mib", ".0f", " MiB")),
        ("done ids held (bytes of the array)", of_resume("done_bytes", ",", " B")),
        ("Ray started", of_resume("ray_s", ".1f", " s")),
        ("done set / checkpoint loaded", of_resume("resume_s", ".2f", " s")),
        ("first new commit, from the driver's start", of_resume("first_commit_s", ".1f", " s")),
        (f"remaining {remaining:,} in all", of_resume("seconds", ".0f", " s")),
        ("after the resume: rows / distinct / twice / missing", lambda r: counts(r["resume"]["output"])),
        ("kill: new commits, uncommitted writes, strays lived", lambda r: kill_line(r["kill"])),
        (
            "re-run after the kill: first new commit",
            lambda r: cell(r["rerun"]["first_commit_s"], ".1f", " s"),
        ),
        ("re-run after the kill: in all", lambda r: cell(r["rerun"]["seconds"], ".0f", " s")),
        ("after kill + re-run: rows / distinct / twice / missing", lambda r: counts(r["rerun"]["output"])),
        ("output files (unreadable)", lambda r: "{files:,} ({unreadable})".format(**r["rerun"]["output"])),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  {'(a) done set':>28}  {'(b) Ray checkpoint_config':>28}")
    for name, value in rows:
        print(f"{name:{width}}  {value(a):>28}  {value(b):>28}")
    ra, rb = a["resume"], b["resume"]
    print(
        f"ratios (b)/(a): driver peak {rb['driver_mib'] / ra['driver_mib']:.2f}x, whole tree "
        f"{rb['tree_mib'] / ra['tree_mib']:.2f}x, done ids {rb['done_bytes'] / ra['done_bytes']:.1f}x, "
        f"first new commit {rb['first_commit_s'] / ra['first_commit_s']:.2f}x, "
        f"remaining in all {rb['seconds'] / ra['seconds']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return 0
    if args.done >= args.inputs:
        raise SystemExit("ray_checkpoint.py: error: --done must be below --inputs (see --help)")
    os.makedirs(args.workdir, exist_ok=True)
    manifest, made = prepare(args.workdir, args.inputs, args.done, args.batch_size, args.cpus)
    results = {}
    for arm in ("done-set", "ray"):
        results[arm] = measure(args.workdir, arm, manifest, args)
        print(json.dumps({arm: results[arm]}), flush=True)
    report(results, made, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
