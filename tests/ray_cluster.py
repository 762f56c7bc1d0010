"""A multi-node Ray cluster on this machine for tests: real raylets, one per node, no mocks.

`ray.cluster_utils.Cluster` runs in a process of its own (`python tests/ray_cluster.py`), driven
over its stdin/stdout with one JSON object per line, so that the cluster's processes get an
environment of the test's choosing (a HOME without the suite's Ray auth token, the variables a
test sets) and the test process's own Ray is left alone. Every process of the cluster is in the
harness's process group: `MultiNodeCluster.close` ends them all, and nothing else (never
`ray stop`, which would stop every Ray on the machine).

Nodes share this machine's filesystem, so a shared-storage check passes here truthfully; a node
that must *not* see a folder runs under `unshare --mount` with a tmpfs over it
(`MultiNodeCluster.add_isolated_node`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class MultiNodeCluster:
    """A head node plus worker nodes added and killed by name; use as a context manager."""

    def __init__(self, head_cpus: float, env: dict[str, str] | None = None):
        self.env = cluster_environment(env)
        self._process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            text=True,
            start_new_session=True,
        )
        self._isolated: list[subprocess.Popen] = []
        self.address = self._call("start", num_cpus=head_cpus)["address"]
        # What a job submitted to this cluster gets: RAY_ADDRESS, and no token to send.
        self.job_env = {**self.env, "RAY_ADDRESS": self.address}

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_node(self, name: str, num_cpus: float, **resources) -> dict:
        """Start a worker node; returns its `node_id`."""
        return self._call("add", name=name, num_cpus=num_cpus, **resources)

    def kill_node(self, name: str) -> None:
        """Kill the node's raylet and every process on it, as a crash of the machine would."""
        self._call("kill", name=name)

    def node_of(self, pid: int) -> str:
        """The name of the node whose raylet started process `pid`."""
        return self._call("node_of", pid=pid)["name"]

    def add_isolated_node(self, num_cpus: float, hidden_folder: str) -> None:
        """A worker node in a mount namespace of its own, where `hidden_folder` is an empty tmpfs."""
        command = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mkdir -p "$0" && mount -t tmpfs none "$0" && exec "$@"', hidden_folder,
            str(BIN / "ray"), "start", "--block", f"--address={self.address}",
            f"--num-cpus={num_cpus}", "--disable-usage-stats",
        ]  # fmt: skip
        before = self._call("count")["nodes"]
        self._isolated.append(
            subprocess.Popen(
                command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        self._call("wait_for_nodes", count=before + 1)

    def close(self) -> None:
        for process in self._isolated:
            _kill_group(process)
        if self._process.poll() is None:
            try:
                self._call("shutdown")
                self._process.wait(timeout=60)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                pass
        _kill_group(self._process)
        _kill_marked(self.env[MARKER])

    def _call(self, op: str, **args) -> dict:
        self._process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster harness ended during {op!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cluster harness, {op}: {reply['error']}")
        return reply


class FakeAutoscalingCluster:
    """`ray start --head` with Ray's fake multi-node autoscaler: it starts a local raylet per node
    it launches, with the resources its node type declares (a "GPU" there is a resource only).

    `node_types` maps a worker node type's name to its resources, e.g. `{"gpu": {"CPU": 1,
    "GPU": 1}}`; each scales from 0 to 1 node. Use as a context manager.
    """

    def __init__(self, head_cpus: int, node_types: dict[str, dict], free_port, env: dict | None = None):
        autoscaler = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.env = cluster_environment({**autoscaler, **(env or {})})
        self.temp_dir = tempfile.mkdtemp(prefix="fac-", dir="/tmp")
        port = free_port()
        config = {
            "cluster_name": "fake-gpu",
            "max_workers": len(node_types),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": f"127.0.0.1:{port}",
            },
            "auth": {},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                **{
                    name: {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}
                    for name, resources in node_types.items()
                },
            },
            "head_node_type": "ray.head.default",
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        config_file = Path(self.temp_dir) / "autoscaler.json"
        config_file.write_text(json.dumps(config))
        self._head = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                f"--autoscaling-config={config_file}", f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],  # fmt: skip
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.address = f"127.0.0.1:{port}"
        self.job_env = {**self.env, "RAY_ADDRESS": self.address}
        self._wait_until_up()

    def __enter__(self) -> FakeAutoscalingCluster:
        return self

    def __exit__(self, *exc) -> None:
        _kill_group(self._head)
        # The autoscaler's nodes run in processes of their own: end every process of this cluster.
        _kill_marked(self.env[MARKER])

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + 120
        probe = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
        while subprocess.run(probe, env=self.job_env, capture_output=True).returncode != 0:
            if self._head.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the fake autoscaling cluster did not come up")
            time.sleep(1)


MARKER = "MRCNN_TEST_CLUSTER"
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


def cluster_environment(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of a test cluster's processes and of the jobs submitted to it.

    A HOME of its own (no auth token of this machine's user: the cluster runs without one, and
    jobs that join it send none), and a random `MRCNN_TEST_CLUSTER` marker by which its processes
    are found (`processes_of`) and ended.
    """
    env = {
        **os.environ,
        "HOME": tempfile.mkdtemp(prefix="cluster-home-"),
        "RAY_USAGE_STATS_ENABLED": "0",
        MARKER: os.urandom(6).hex(),
        **(extra or {}),
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    return env


def processes_of(env: dict[str, str], title_part: str = "") -> list[int]:
    """PIDs of the processes of the cluster with environment `env` whose command line has `title_part`."""
    found = []
    wanted = f"{MARKER}={env[MARKER]}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if title_part in title and wanted in environ and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _kill_marked(marker: str) -> None:
    for pid in processes_of({MARKER: marker}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait()


def _ancestors(pid: int) -> list[int]:
    """The parent, grandparent... of process `pid`, read from /proc."""
    found = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as file:
            # "pid (name) state ppid ...": the name may hold spaces, the last ")" ends it.
            pid = int(file.read().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found


def _serve() -> None:
    """The harness process: one command per stdin line, one JSON reply per stdout line."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    out = sys.stdout
    # Ray's own output must not mix with the replies.
    sys.stdout = sys.stderr
    cluster: Cluster | None = None
    nodes: dict = {}

    def raylet_pid(node) -> int:
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def alive_nodes() -> int:
        return sum(1 for node in ray.nodes() if node["Alive"])

    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op == "start":
                cluster = Cluster(
                    initialize_head=True,
                    head_node_args={
                        "num_cpus": command["num_cpus"],
                        "include_dashboard": False,
                        # Not /tmp/ray, whose "current cluster" file `ray.init()` elsewhere would find.
                        "temp_dir": tempfile.mkdtemp(prefix="mnc-", dir="/tmp"),
                        # A killed node is declared dead after ~3 s instead of Ray's ~15-30 s
                        # (5 failed checks 3 s apart, after a 5 s delay): what the tests watch is
                        # what happens after the death, not how long Ray takes to notice it.
                        "_system_config": HEALTH_CHECKS,
                    },
                )
                nodes["head"] = cluster.head_node
                # A driver of the harness's own, for `ray.nodes()`.
                cluster.connect()
                reply = {"address": cluster.address}
            elif op == "add":
                name = command.pop("name")
                node = cluster.add_node(**command)
                cluster.wait_for_nodes()
                nodes[name] = node
                reply = {"node_id": node.node_id}
            elif op == "kill":
                cluster.remove_node(nodes.pop(command["name"]), allow_graceful=False)
                reply = {}
            elif op == "node_of":
                by_raylet = {raylet_pid(node): name for name, node in nodes.items()}
                names = [by_raylet[p] for p in _ancestors(command["pid"]) if p in by_raylet]
                reply = {"name": names[0] if names else None}
            elif op == "count":
                reply = {"nodes": alive_nodes()}
            elif op == "wait_for_nodes":
                deadline = time.monotonic() + 120
                while alive_nodes() < command["count"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"fewer than {command['count']} nodes after 120 s")
                    time.sleep(0.2)
                reply = {}
            elif op == "shutdown":
                cluster.shutdown()
                out.write("{}\n")
                out.flush()
                return
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as error:  # the test gets the message; the harness serves on
            reply = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
