"""A Ray head on this machine started the way cluster.yaml starts its head.

The environment assignments and flags of cluster.yaml's `ray start --head` command are kept; only
what cannot work on a laptop changes: free ports instead of fixed ones, 127.0.0.1 as the node
address, a temp dir of its own, no autoscaler config (it would launch EC2 instances) and `--block`
so that the test owns the processes. The token comes as on the cluster: `ray get-auth-token
--generate` in a HOME of the test's own, so no token of this machine's user is read or written.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Flags whose cluster values are fixed ports, or files that exist only on a launched head.
REPLACED_FLAGS = ("--port", "--object-manager-port", "--autoscaling-config")


def head_start_command() -> tuple[dict[str, str], list[str]]:
    """The environment and the arguments of `ray` (`start --head ...`) in cluster.yaml's head."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    line = next(cmd for cmd in config["head_start_ray_commands"] if "ray start --head" in cmd)
    words = shlex.split(next(part for part in line.split(";") if "ray start" in part))
    start = words.index("ray")
    env = dict(word.split("=", 1) for word in words[:start])
    return env, words[start + 1 :]


def client_environment(home: Path) -> dict[str, str]:
    """This machine's environment with HOME at `home` and this environment's `ray` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return env


def generate_token(home: Path) -> str:
    """`ray get-auth-token --generate`, as README has the user run it; returns the token."""
    result = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=client_environment(home),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@contextmanager
def local_head(home: Path, free_port: Callable[[], int], num_cpus: int = 2) -> Iterator[str]:
    """Start the head with HOME=`home`; yields the job API's address. Stops only its own processes."""
    env, args = head_start_command()
    args = [arg for arg in args if arg.split("=")[0] not in REPLACED_FLAGS]
    dashboard_port, agent_port = free_port(), free_port()
    # A short temp dir: Ray's Unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="head-", dir="/tmp")
    log = open(Path(temp_dir) / "ray-start.log", "w+")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), *args, "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
        ],  # fmt: skip
        env={**client_environment(home), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_api(address, agent_port, head, home, log)
        yield address
    finally:
        # Only this head's processes: `ray stop` would stop every Ray on the machine. A few
        # seconds to stop cleanly, then a kill: the test's data is on disk already.
        _kill_group(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_fails(home: Path, free_port: Callable[[], int]) -> str:
    """Start the head expecting it to exit at once; returns what it printed."""
    try:
        with local_head(home, free_port):
            pass
    except HeadExited as exited:
        return str(exited)
    raise AssertionError("the head started")


class HeadExited(RuntimeError):
    """`ray start --head` ended before its job API answered."""


def ray_cli(home: Path, *args: str, timeout: float | None = None, **env: str) -> subprocess.CompletedProcess:
    """The `ray` CLI of this environment run with HOME=`home` and the extra `env`."""
    return subprocess.run(
        [str(BIN / "ray"), *args], env={**client_environment(home), **env}, capture_output=True, text=True,
        timeout=timeout,
    )


# What the CLI prints when the head could not take a submission at all; the submission is no job.
NOT_TAKEN = ("No available agent", "Failed to connect to Ray at address")


def submit_job(
    home: Path, *args: str, timeout: float | None = None, **env: str
) -> subprocess.CompletedProcess:
    """`ray job submit *args`, sent again while the head could not take it: "No available agent
    ... please try again later" (its job agent has not registered yet; the head waits only 10 s
    for it, too short on a loaded 2-core machine) or no answer from the dashboard at all. Neither
    creates a job, so retrying adds none."""
    deadline = time.monotonic() + 120
    while True:
        submitted = ray_cli(home, "job", "submit", *args, timeout=timeout, **env)
        if not any(sign in submitted.stderr for sign in NOT_TAKEN) or time.monotonic() > deadline:
            return submitted
        time.sleep(3)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _wait_for_job_api(address: str, agent_port: int, head: subprocess.Popen, home: Path, log) -> None:
    """Until the dashboard answers `job list` and the head's job agent (which runs submitted
    jobs) listens on its port."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            log.seek(0)
            raise HeadExited(f"ray start exited with {head.returncode}: {log.read()[-3000:]}")
        listed = ray_cli(home, "job", "list", "--address", address, RAY_AUTH_MODE="token")
        if listed.returncode == 0 and _listens(agent_port):
            return
        time.sleep(2)
    raise RuntimeError("the Ray job API did not come up within 120 s")


def _listens(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        return True
    return False
