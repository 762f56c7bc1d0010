"""What a cluster can hold: whether a job's actors or workers fit a node that is up, a node type an
autoscaler can add, or nothing ever; the `auto` choice of GPUs; a line a minute while a job waits.

A request no node and no node type can ever hold would otherwise wait out `--resource-timeout`
(20 minutes by default) before the job said anything. Before it creates its actors or workers, a
job that joined a cluster asks `check_placement`, which answers from what Ray publishes:
1. The alive nodes' total resources (`ray.nodes()`): a node that holds one bundle may free up.
2. The node types an autoscaler can add: autoscaler v2 (KubeRay, `RAY_enable_autoscaler_v2=1`)
   publishes them in the GCS (`pipeline.cluster.ray_compat.autoscaler_node_types`).
3. Autoscaler v1 (`ray up`, the fake multi-node provider) publishes no node types, only its
   status: what it is launching, once per update (`pipeline.cluster.ray_compat.autoscaler_status`). So the
   job asks it: a placement group of one bundle, which the autoscaler treats as demand, and
   `PROBE_UPDATES` of its updates (5 s each by default) to start a launch for it. A launch
   means a node type fits (and the node it starts is the one the job then uses); none means no
   type fits, or the autoscaler is at its `max_workers`. A head started without an autoscaler
   config runs v1 with a read-only provider, which never launches.
Neither signal at all (no autoscaler publishes a status): only the alive nodes count.

`auto_gpus` turns `--gpus-per-actor auto` into a number the same way: GPUs when a node that is
up has one or a node type that can be added does, CPU actors otherwise.

While the job waits for a request that can be placed, `WaitReport` prints one line a minute
saying what it waits for and what the cluster and its autoscaler are doing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mrcnn.errors import UserError
from pipeline.cluster import ray_compat

# Autoscaler v1 updates seen with the probe pending before its answer ("no launch") is taken.
PROBE_UPDATES = 3
# The probe gives up after this long without those updates (an autoscaler that died).
PROBE_TIMEOUT_S = 45.0
PROBE_POLL_S = 0.5
REPORT_EVERY_S = 60.0


class InfeasibleRequest(UserError):
    """A request no node of the cluster and no node type of its autoscaler can ever hold."""


@dataclass(frozen=True)
class Placement:
    """Where a bundle can run: `where` is "node" (a node that is up holds it), "autoscaler" (a
    node type it can add holds it: `node_types`), or "nowhere"."""

    where: str
    node_types: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.where == "node":
            return "a node of the cluster holds it"
        if self.where == "autoscaler":
            kinds = ", ".join(self.node_types) or "a node type"
            return f"the autoscaler can add {kinds} for it"
        return "no node of the cluster and no node type of its autoscaler holds it"


def describe_bundle(bundle: Mapping[str, float]) -> str:
    """`{'CPU': 1, 'GPU': 1}` as `1 CPU and 1 GPU`; memory in GiB."""
    parts = []
    for name, amount in bundle.items():
        if name == "memory":
            parts.append(f"{amount / (1 << 30):.1f} GiB of memory")
        else:
            parts.append(f"{amount:g} {name}")
    return " and ".join(parts)


def fits(bundle: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    """Whether `resources` (a node's totals) hold `bundle`."""
    return all(resources.get(name, 0.0) >= amount for name, amount in bundle.items() if amount > 0)


def alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def check_placement(bundle: Mapping[str, float]) -> Placement:
    """Where `bundle` can run on the connected cluster (see the module docstring)."""
    bundle = {name: amount for name, amount in bundle.items() if amount > 0}
    if any(fits(bundle, resources) for resources in alive_node_resources()):
        return Placement("node")
    node_types = ray_compat.autoscaler_node_types()
    if node_types is not None:
        fitting = tuple(name for name, resources in node_types.items() if fits(bundle, resources))
        return Placement("autoscaler", fitting) if fitting else Placement("nowhere")
    return _probe_autoscaler_v1(bundle)


def _probe_autoscaler_v1(bundle: dict[str, float]) -> Placement:
    """Ask an autoscaler v1 with a placement group of `bundle` whether it launches a node for it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    status = ray_compat.autoscaler_status()
    if status is None:
        return Placement("nowhere")
    group = placement_group([bundle])
    try:
        updates, last = 0, status.get("time")
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline and updates < PROBE_UPDATES:
            ready, _ = ray.wait([group.ready()], timeout=PROBE_POLL_S)
            if ready or any(fits(bundle, resources) for resources in alive_node_resources()):
                return Placement("node")
            status = ray_compat.autoscaler_status() or {}
            launching = _launching(status)
            if launching:
                return Placement("autoscaler", launching)
            if status.get("time") != last:
                updates, last = updates + 1, status.get("time")
        return Placement("nowhere")
    finally:
        remove_placement_group(group)


def _launching(status: dict) -> tuple[str, ...]:
    """The node types an autoscaler v1 status says are being launched or are starting."""
    report = status.get("autoscaler_report") or {}
    kinds = {name for name, count in (report.get("pending_launches") or {}).items() if count}
    kinds.update(node[1] for node in report.get("pending_nodes") or () if len(node) > 1)
    return tuple(sorted(kinds))


def require_placement(bundle: Mapping[str, float], what: str, way_out: str) -> Placement:
    """`check_placement(bundle)`, raising `InfeasibleRequest` (one line: `what`, the bundle and
    `way_out`) when nothing can ever hold it."""
    placement = check_placement(bundle)
    if placement.where == "nowhere":
        raise InfeasibleRequest(
            f"{what} of {describe_bundle(bundle)} can never be placed: {placement.describe()}; "
            f"{way_out}"
        )
    return placement


def auto_gpus(gpus_per_unit: float, cpus: float) -> tuple[float, str]:
    """(GPUs per actor, the reason in words) for `auto` on the connected cluster."""
    placement = check_placement({"CPU": cpus, "GPU": gpus_per_unit})
    if placement.where == "nowhere":
        return 0.0, "the cluster has no GPU node and its autoscaler no node type with a GPU"
    if placement.where == "node":
        return gpus_per_unit, "the cluster has GPU nodes"
    return gpus_per_unit, f"the cluster's autoscaler can add GPU nodes ({', '.join(placement.node_types)})"


class WaitReport:
    """While a job waits for the cluster to place its actors or workers, print one line every
    `every_s` seconds saying what it waits for and what the cluster is doing, until `stop()`.

    `say` prints a line (the job's own printer); `start()` it (or use it as a context manager)
    when the wait begins; `done`, if given, says that the wait is over without a `stop()`.
    """

    def __init__(
        self,
        say: Callable[[str], None],
        what: str,
        bundle: Mapping[str, float],
        timeout_s: float,
        every_s: float = REPORT_EVERY_S,
        done: Callable[[], bool] | None = None,
    ) -> None:
        self._say, self._what, self._bundle, self._done = say, what, dict(bundle), done
        self._timeout_s, self._every_s = timeout_s, every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wait-report", daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()


    def __enter__(self) -> WaitReport:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            if self._done is not None and self._done():
                return
            try:
                line = self.line(time.monotonic() - self._started)
            except Exception:  # a report must never end the job it reports on
                continue
            if not self._stopped.is_set():
                self._say(line)

    def line(self, waited_s: float) -> str:
        """What the job waits for after `waited_s` seconds, in one line."""
        holding = sum(fits(self._bundle, resources) for resources in alive_node_resources())
        status = ray_compat.autoscaler_status() or {}
        launching = _launching(status)
        if holding:
            cluster = f"{holding} node(s) of the cluster can hold one: waiting for them to free up or start"
        elif launching:
            cluster = f"the autoscaler is starting {', '.join(launching)}"
        else:
            cluster = "no node of the cluster can hold one yet"
        return (
            f"still waiting for {self._what} of {describe_bundle(self._bundle)} after {waited_s:.0f} s "
            f"(gives up after {self._timeout_s:g} s, --resource-timeout): {cluster}"
        )
