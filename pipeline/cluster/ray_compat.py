"""Every use of a private or undocumented Ray name in the project, behind one seam.

Written for Ray 2.60 (pinned in pyproject.toml). Each entry below says what it does, why no public
API serves, and what to watch upstream. `check_ray_version` fails loudly, with one line, when a
name this module needs is gone or renamed: both jobs call it at their start, and
`tests/test_cluster_rules.py` calls it, so that a Ray upgrade breaks a job at once instead of
making a fix silently do nothing.

The names:
1. `ray.train.torch.config._TorchBackend`: the CUDA check before Ray Train's process group.
2. `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` and `WorkerGroupStartupTimeoutError`
   (`ray.train.v2._internal`): a time budget for placing training workers.
3. `RAY_TRAIN_ENABLE_PRINT_PATCH` (`ray.train.v2._internal.constants`): plain prints in workers.
4. `ray.data._internal.execution.execution_callback.ExecutionCallback` and the streaming
   executor's `_topology`: the idle backoff of Ray Data's scheduling loop, and the progress line
   of a job whose output is not a terminal (its operators' `name`, `metrics.row_outputs_taken`
   and `num_output_rows_total()`, what Ray Data's own progress bars show).
5. `ray.init(_system_config={"num_workers_soft_limit": N})`: idle task workers kept alive.
6. `ray._private.state.state.get_cluster_config()`: the node types an autoscaler v2 can add.
7. The internal KV key `__autoscaling_status` (`ray._private.ray_constants.
   DEBUG_AUTOSCALING_STATUS`): what an autoscaler v1 is launching.
8. `RAY_API_SERVER_ADDRESS` (`ray._private.ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_
   VARIABLE`): where the state API finds the dashboard of a job's own local Ray
   (`pipeline.cluster.session`). Ray Train's placement-group cleaner asks the state API whether
   the run's controller lives; without the variable, the API looks for the last cluster `ray
   start` ran on this machine and every question waits out its 10 s timeout, which held every
   local training run 12 s at its end. Watch: ray-project/ray `python/ray/dashboard/utils.py`
   (`get_address_for_submission_client`).
9. `ray._private.worker.global_worker_stdstream_dispatcher` and its `"ray_print_logs"` handler
   (`ray.init(log_to_driver=True)`), with `ray.experimental.tqdm_ray.RAY_TQDM_MAGIC`: Ray Data's
   progress bars drawn in a worker (Ray Train's dataset coordinator) reach the driver as marked
   lines of the worker output Ray forwards; a job keeps those and drops the rest
   (`pipeline.cluster.job_log`). No public API forwards the bars without everything else the
   workers print. Watch: ray-project/ray `python/ray/_private/worker.py` (`print_worker_logs`,
   `connect`) and `python/ray/_private/ray_logging/__init__.py`.
10. `MapOperator._output_blocks_stats` (`ray.data._internal.execution.operators.map_operator`):
   the stats of every block a map operator puts out, kept on the driver for the whole execution
   (for `Dataset.stats()`), about 1.1 KB per block: 0.85 KB per image in the segmentation
   dataset, 8.6 GB at 10 million. `BoundedBlockStats` keeps the last `KEPT_BLOCK_STATS` of each
   operator; no setting turns the list off. Watch: ray-project/ray `python/ray/data/_internal/
   execution/operators/map_operator.py` (`_get_next_inner`, `get_stats`).
11. `ray.data._internal.execution.backpressure_policy` (`BackpressurePolicy`, the enabled list
   and its `DataContext.set_config` key): Ray Data's policies count bytes, and a stage whose
   blocks are a few paths (the cut of the listing into batches) ran ahead of the decode tasks
   through the whole listing, the driver holding a `RefBundle` (about 2.5 KB) per batch not yet
   decoded. `QueuedBlocksCap` counts blocks instead. Watch: ray-project/ray
   `python/ray/data/_internal/execution/backpressure_policy/__init__.py`.

Tests use a few more, which no job runs: Ray's own autoscaler config validation
(`ray.autoscaler._private`, in `tests/test_cluster_*.py`) and Ray's constants and node info in
`tests/ray_cluster.py` and `tests/test_segment.py`; an upgrade that moves them fails those tests.

Replaced by a public way, and so no longer here: the runtime env that kept one-CPU inference
actors from fusing with the decode tasks (the actors now ask for the memory they need, and Ray
Data's documented rule keeps stages with different resource requirements apart).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray

from mrcnn.errors import UserError

if TYPE_CHECKING:
    # `ray.train.torch` imports torch: imported where it is used, so that a segmentation job's
    # driver, which checks this module's Ray Data names, stays torch-free.
    from ray.train.torch import TorchConfig

WRITTEN_FOR = "2.60"

# 4. Ray Data calls an `ExecutionCallback` after every pass of its scheduling loop; Ray 2.60
# exposes the hook only as `DataContext.custom_execution_callback_classes`, whose base class lives
# under `_internal`. Watch: ray-project/ray `python/ray/data/_internal/execution/
# execution_callback.py` (and an upstream fix of the busy loop itself, which would make the
# backoff unnecessary).
try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # reported, in one line, by check_ray_version
    ExecutionCallback = object

# 3. Ray Train 2.60 patches `print` in its workers to go through a logger and also tees it when
# stdout is redirected: our epoch lines came out twice and pycocotools' output escaped
# `redirect_stdout`. The switch is an environment variable defined under `_internal` (no
# `RunConfig` field). Watch: ray-project/ray `python/ray/train/v2/_internal/constants.py`.
TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"

# 2. Ray Train's controller waits this long for a worker group's placement before it counts a
# failure and tries again; defined in `ray/train/v2/_internal/constants.py`
# (`WORKER_GROUP_START_TIMEOUT_S_ENV_VAR`, default 60) and read in the controller's process: set
# it for the whole cluster (e.g. on `ray start`) to change it; the driver reads the same variable
# to turn a time budget into a number of tries.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_GROUP_START_TIMEOUT_S = 60.0

# 5. While actors hold a node's CPUs, Ray 2.60 kills an idle task worker a moment after it goes
# idle, so each short decode task started a new Python process that imported torch again
# (figures in BENCHMARKS.md, "Training throughput on 2 cores").
# `num_workers_soft_limit` is a Ray system config (C++ `ray_config_def.h`), reached through the
# private `_system_config` of `ray.init`, or `RAY_num_workers_soft_limit` on `ray start`
# (cluster.yaml). A renamed key makes `ray.init` fail at once (Ray rejects unknown keys), so it
# needs no check here. Watch: ray-project/ray `src/ray/common/ray_config_def.h`.
def local_system_config(workers_soft_limit: int) -> dict:
    """`_system_config` of a local `ray.init` that keeps up to `workers_soft_limit` idle workers."""
    return {"num_workers_soft_limit": workers_soft_limit}


# 6. The node types an autoscaler can add, for the placement check (`pipeline.cluster.placement`). The
# autoscaler v2 (KubeRay, `RAY_enable_autoscaler_v2=1`) reports them to the GCS as a
# `ClusterConfig` protobuf; Ray reads it only through `ray._private.state` (Ray Train and Ray Data
# do the same, for their own checks). No public API lists node types. Watch: ray-project/ray
# `python/ray/_private/state.py` (`get_cluster_config`).
def autoscaler_node_types() -> dict[str, dict[str, float]] | None:
    """Node type name -> the resources of one node of it, for the types an autoscaler v2 may still
    add (`max_count` not 0); None when no autoscaler v2 publishes them."""
    from ray._private import state

    config = state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return {
        group.name: {name: float(amount) for name, amount in group.resources.items()}
        for group in config.node_group_configs
        if group.max_count != 0
    }


# 7. The autoscaler v1 (`ray up`'s, the fake multi-node provider's, and the read-only one of a head
# started without an autoscaler config) publishes nothing of its node types, only a JSON status per
# update under this internal KV key (what `ray status` prints): its `time`, and in
# `autoscaler_report` the `pending_launches` and `pending_nodes` by node type. Watch: ray-project/ray
# `python/ray/autoscaler/_private/monitor.py` (`DEBUG_AUTOSCALING_STATUS`).
def autoscaler_status() -> dict | None:
    """The latest autoscaler v1 status, or None when no autoscaler publishes one."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


# Per-block stats each map operator keeps (10.): `Dataset.stats()` and Ray Data's end-of-run
# summary then describe the last blocks of each stage, a sample the size of a small run.
KEPT_BLOCK_STATS = 1000


class BoundedBlockStats(ExecutionCallback):
    """A Ray Data execution callback that keeps, after every pass of the scheduling loop, only the
    last `KEPT_BLOCK_STATS` per-block stats of each operator (10.): the driver's memory then
    does not grow with the number of blocks a dataset puts out."""

    def on_execution_step(self, executor) -> None:
        trim_block_stats(executor, KEPT_BLOCK_STATS)


def trim_block_stats(executor, keep: int) -> int:
    """Drop all but the last `keep` per-block stats of each operator of a running Ray Data
    streaming executor (10.), once an operator holds twice that (amortised: one slice per `keep`
    blocks); returns how many the operators hold now."""
    held = 0
    for op in getattr(executor, "_topology", None) or {}:
        stats = getattr(op, "_output_blocks_stats", None)
        if not isinstance(stats, list):
            continue
        if len(stats) >= 2 * keep:
            del stats[: len(stats) - keep]
        held += len(stats)
    return held


# 11. Ray Data's backpressure policies, extended by one of ours.
try:
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
        BackpressurePolicy,
    )
except ImportError:  # reported, in one line, by check_ray_version
    BackpressurePolicy = object
    ENABLED_BACKPRESSURE_POLICIES, ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY = None, None

# Blocks a capped operator may have waiting before it starts no more tasks; a running task still
# puts out all of its own (one cut of a 1 MiB listing block: about 4,000 batches of 4 paths).
MAX_QUEUED_BLOCKS = 256


class QueuedBlocksCap(BackpressurePolicy):
    """A Ray Data backpressure policy (11.): an operator whose name starts with one of `names`
    starts no task while `MAX_QUEUED_BLOCKS` of its blocks wait for the operators it feeds."""

    names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "QueuedBlocksCap"

    def can_add_input(self, op) -> bool:
        if not op.name.startswith(self.names):
            return True
        return queued_blocks(self._topology, op) < MAX_QUEUED_BLOCKS


def queued_blocks(topology, op) -> int:
    """Blocks `op` has put out that no task has taken yet: those in its output queue and in the
    input queues of the operators it feeds."""
    state = topology.get(op)
    queued = state.output_queue.num_blocks if state is not None else 0
    return queued + sum(down.internal_input_queue_num_blocks() for down in op.output_dependencies)


def add_backpressure_policy(context, policy: type) -> None:
    """Enable `policy` beside Ray Data's own backpressure policies in `context` (a DataContext)."""
    enabled = context.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES)
    if policy not in enabled:
        context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*enabled, policy])


class RayCompatError(UserError):
    """This Ray lacks a name the project relies on; the message is one line."""


def nothing_in_flight(executor) -> bool:
    """Whether a Ray Data streaming executor has started and none of its operators has a task running.

    `_topology` (4.) is the executor's {operator: state}, None before it starts.
    """
    topology = getattr(executor, "_topology", None)
    return bool(topology) and not any(op.num_active_tasks() for op in topology)


def operator_progress(executor) -> list[tuple[str, int, int | None]]:
    """(name, rows put out, rows expected or None) of each operator of a running Ray Data
    streaming executor (4.), in the plan's order, its input buffer left out; empty before it starts."""
    topology = getattr(executor, "_topology", None) or {}
    return [
        (op.name, op.metrics.row_outputs_taken, op.num_output_rows_total())
        for op in topology
        if op.input_dependencies
    ]


PRINT_HANDLER = "ray_print_logs"


def is_progress_bar_line(line: str) -> bool:
    """Whether a line a worker printed is the state of one of Ray's distributed progress bars (9.)."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    return RAY_TQDM_MAGIC in line


def keep_worker_output(keep) -> Callable[[], None] | None:
    """Make this driver print only the lines of its workers' output for which `keep(line)` is true
    (9.); returns the function that restores Ray's printing, or None when this driver prints no
    worker output (`log_to_driver=False`)."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    original = next((handler for name, handler in dispatcher.handlers if name == PRINT_HANDLER), None)
    if original is None:
        return None

    def kept(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if keep(line)]
        if lines:
            original({**data, "lines": lines})

    dispatcher.remove_handler(PRINT_HANDLER)
    dispatcher.add_handler(PRINT_HANDLER, kept)

    def restore() -> None:
        # Only while ours is still there: `ray.shutdown` removes it, and Ray's would then print
        # twice after the next `ray.init` adds its own again.
        if any(handler is kept for _, handler in dispatcher.handlers):
            dispatcher.remove_handler(PRINT_HANDLER)
            dispatcher.add_handler(PRINT_HANDLER, original)

    return restore


def _torch_backend_class() -> type:
    """Ray Train's torch backend class (1.: `ray.train.torch.config._TorchBackend`, private).

    Why: the only hook that runs in every training worker *before* Ray Train creates the
    process group is the backend's `on_start`; with NCCL on a node whose torch sees no GPU the
    process group itself fails first, with an error that names neither the node nor the cause.
    Public `ray.train.backend.Backend` and `TorchConfig` let us subclass but not reach the torch
    backend's own setup without its class. Watch: ray-project/ray `python/ray/train/torch/config.py`
    (a public pre-setup hook for workers would replace this).
    """
    from ray.train.torch import config as torch_config_module

    backend = getattr(torch_config_module, "_TorchBackend", None)
    if backend is None:
        _missing("ray.train.torch.config._TorchBackend")
    return backend


def cuda_checked_torch_config() -> TorchConfig:
    """A `TorchConfig` whose workers run `pipeline.cluster.gpu.require_cuda` before the process group."""
    from ray.train.torch import TorchConfig

    base = _torch_backend_class()

    class CudaCheckedBackend(base):
        def on_start(self, worker_group, backend_config):
            from pipeline.cluster.gpu import require_cuda

            worker_group.execute(require_cuda)
            super().on_start(worker_group, backend_config)

    class CudaCheckedTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return CudaCheckedBackend

    return CudaCheckedTorchConfig()


def worker_group_start_retries(timeout_s: float) -> int:
    """`FailureConfig.controller_failure_limit` for giving up on placement after about `timeout_s`.

    Ray Train 2.60 counts each timed-out placement of the worker group (and each failed start)
    as a controller failure, retried without limit by default (-1): a run that asks for GPUs no
    node has, and no autoscaler can add, would wait forever. `controller_failure_limit` is a
    documented DeveloperAPI field; the per-try timeout behind it is the private variable (2.).
    """
    per_try = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(0, math.ceil(timeout_s / per_try) - 1)


def is_worker_group_start_timeout(error: BaseException) -> bool:
    """True for Ray Train's `WorkerGroupStartupTimeoutError` (2., defined under `_internal`).

    Compared by name: the class is private, and an upgrade that moves it must not break the import
    of this module. Watch: ray-project/ray `python/ray/train/v2/_internal/exceptions.py`.
    """
    return type(error).__name__ == "WorkerGroupStartupTimeoutError"


def check_ray_version(training: bool = True) -> None:
    """Raise `RayCompatError` (one line) when a private name listed above is missing or renamed.

    `training=False` checks only the Ray Data names (4.), without importing Ray Train's torch
    backend, which imports torch: what a segmentation job's driver needs.
    """
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    if ExecutionCallback is object:
        _missing("ray.data._internal.execution.execution_callback.ExecutionCallback")
    # An attribute the constructor assigns is among the names its code stores.
    if "_topology" not in StreamingExecutor.__init__.__code__.co_names:
        _missing("StreamingExecutor._topology")
    _check_progress_names()
    from ray.data._internal.execution.operators.map_operator import MapOperator

    if "_output_blocks_stats" not in MapOperator.__init__.__code__.co_names:
        _missing("MapOperator._output_blocks_stats")
    if BackpressurePolicy is object or not hasattr(MapOperator, "internal_input_queue_num_blocks"):
        _missing("ray.data._internal.execution.backpressure_policy.BackpressurePolicy")
    from ray._private import ray_constants, state

    if not hasattr(state.state, "get_cluster_config"):
        _missing("ray._private.state.state.get_cluster_config")
    if getattr(ray_constants, "DEBUG_AUTOSCALING_STATUS", None) != "__autoscaling_status":
        _missing("ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS")
    api_server = getattr(ray_constants, "RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE", None)
    if api_server != "RAY_API_SERVER_ADDRESS":
        _missing("ray._private.ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE")
    if not training:
        return
    _torch_backend_class()
    from ray.train.v2._internal import constants, exceptions

    if not hasattr(exceptions, "WorkerGroupStartupTimeoutError"):
        _missing("ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError")
    for name, value in (
        ("WORKER_GROUP_START_TIMEOUT_S_ENV_VAR", WORKER_GROUP_START_TIMEOUT_ENV),
        ("ENABLE_PRINT_PATCH_ENV_VAR", TRAIN_PRINT_PATCH_ENV),
    ):
        if getattr(constants, name, None) != value:
            _missing(f"ray.train.v2._internal.constants.{name} == {value!r}")


def _check_progress_names() -> None:
    """The names of 4. that the progress line reads, and those of 9."""
    from ray._private import worker
    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics
    from ray.data._internal.execution.interfaces.physical_operator import PhysicalOperator
    from ray.experimental import tqdm_ray

    if "row_outputs_taken" not in getattr(OpRuntimeMetrics, "__dataclass_fields__", {}):
        _missing("OpRuntimeMetrics.row_outputs_taken")
    if not hasattr(PhysicalOperator, "num_output_rows_total"):
        _missing("PhysicalOperator.num_output_rows_total")
    dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
    if not hasattr(dispatcher, "handlers") or not hasattr(tqdm_ray, "RAY_TQDM_MAGIC"):
        _missing("ray._private.worker.global_worker_stdstream_dispatcher.handlers")


def _missing(name: str) -> None:
    raise RayCompatError(
        f"Ray {ray.__version__} has no {name} (this project was written for Ray {WRITTEN_FOR}): "
        f"pin ray=={WRITTEN_FOR}.0 or update pipeline/cluster/ray_compat.py"
    )
