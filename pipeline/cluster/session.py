"""Connect a job to Ray: reuse the Ray of this process, join a cluster, or start a private local one.

Three cases, in this order:

1. Ray is already initialised in this process (a test fixture, a notebook): use it as it is and
   leave it running afterwards.
2. `RAY_ADDRESS` is set (a shell pointed at a cluster, or a driver started by `ray job submit`,
   which sets it): join that cluster. Non-secret S3 settings of this process (`AWS_ENDPOINT_URL`,
   region, `MRCNN_S3_MAX_ATTEMPTS`, `MRCNN_S3_TRACE`) are forwarded to the workers through the
   job's runtime environment; credentials never are (a runtime environment is visible in the
   dashboard), so the cluster's nodes need their own (instance roles, or the job's
   `--runtime-env`). A variable that
   `ray job submit --runtime-env-json '{"env_vars": ...}'` already sets is not forwarded again:
   Ray 2.60's `ray.init` refuses a runtime env that names the same variable as the submitted one
   (ValueError, even for an equal value), and the submitted one already reaches every worker.
3. Otherwise start a new local Ray (`address="local"`, so that a stray cluster of another user on
   the same machine is never joined by accident) with the dashboard, when its dependencies are
   installed, on a free port of 127.0.0.1 only (the job's processes get its address for Ray's
   state API): the dashboard and job API have had no authentication by
   default (CVE-2023-48022). Ray refuses a loopback node address for its own services, which Ray
   2.60 protects with token authentication by default (`RAY_AUTH_MODE=token`, on since 2.52; keep
   it on for clusters too). Reach a remote dashboard through an SSH tunnel.

A local Ray keeps idle task workers alive (`num_workers_soft_limit`). With Ray's default, while
actors hold a node's CPUs (Ray Train's workers do, for the whole run) a task worker is killed a
moment after it goes idle, so every short decode task started a fresh Python process that
imports Ray, NumPy and PyTorch again, on the CPUs training needs (figures in BENCHMARKS.md,
"Training throughput on 2 cores"). A cluster started with `ray start` sets this on its own command
line (cluster.yaml).

Either way the job's console keeps to its own lines unless `--verbose` or `MRCNN_VERBOSE=1`
(`pipeline.cluster.job_log`): what the workers print stays in Ray's log files, but for Ray Data's
progress bars where stdout is a terminal (`pipeline.cluster.progress`). Ray started here is shut
down when the `ray_session` block ends.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

LOCALHOST = "127.0.0.1"
# Worker processes a local Ray keeps before it kills idle ones: above the actors of a training or
# segmentation run (a dozen) plus a decode worker per fractional CPU slot.
LOCAL_WORKERS_SOFT_LIMIT = 32

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MRCNN_S3_MAX_ATTEMPTS",
    "MRCNN_S3_TRACE",
)

# Where Ray's state API (`ray.util.state`) finds the dashboard: read by Ray before it falls back to
# the address of the last `ray start` on this machine (`pipeline.cluster.ray_compat`, 8.).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

# Set by Ray's job supervisor for the driver of a submitted job: the job's runtime env, as JSON.
SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class RaySession:
    """Which Ray a job runs on.

    `joined_cluster`: a cluster named by `RAY_ADDRESS`, which may have more nodes than this one and
    may add nodes when asked (an autoscaler); otherwise a Ray of this process, whose resources are
    this machine's and are what they are.
    """

    joined_cluster: bool


def forwarded_env() -> dict[str, str]:
    """The non-secret storage settings of this process that Ray workers must see too.

    Those the submitted job's runtime env sets are left out: they reach the workers already.
    """
    submitted = submitted_env_vars()
    return {
        name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name) and name not in submitted
    }


def submitted_env_vars() -> dict[str, str]:
    """The `env_vars` of the runtime env `ray job submit` gave this driver; empty outside a job."""
    config = json.loads(os.environ.get(SUBMITTED_JOB_CONFIG) or "{}")
    return (config.get("runtime_env") or {}).get("env_vars") or {}


@contextmanager
def ray_session(
    num_cpus: int | None = None, num_gpus: int | None = None, verbose: bool = False
) -> Iterator[RaySession]:
    """Make Ray usable inside the block (see the module docstring for which Ray).

    `num_cpus` / `num_gpus` size a local Ray started here (None: what the machine has); they are
    ignored when an existing Ray is used, whose resources are the cluster's. Unless `verbose`,
    Ray's console output is kept to the job's own lines (`pipeline.cluster.job_log.QuietRay`).
    """
    import ray

    from pipeline.cluster.job_log import QuietRay, quiet_ray_init, verbose_requested
    from pipeline.cluster.progress import bars_on_terminal

    joined_cluster = bool(os.environ.get("RAY_ADDRESS"))
    verbose = verbose_requested(verbose)
    if ray.is_initialized():
        with QuietRay(verbose):
            yield RaySession(joined_cluster)
        return
    previous_api = os.environ.get(API_SERVER_ENV)
    with quiet_ray_init(verbose):
        _init(num_cpus, num_gpus, log_to_driver=verbose or bars_on_terminal())
    try:
        with QuietRay(verbose):
            yield RaySession(joined_cluster)
    finally:
        ray.shutdown()
        if previous_api is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous_api


def _init(num_cpus: int | None, num_gpus: int | None, log_to_driver: bool) -> None:
    """`ray.init`: join `RAY_ADDRESS`, or start a local Ray (module docstring, 2. and 3.)."""
    import ray

    from pipeline.cluster.ray_compat import local_system_config

    runtime_env = {"env_vars": forwarded_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        port = free_local_port()
        # The state API of this Ray, for this process and its workers (Ray Train's placement-group
        # cleaner asks it whether the run's controller lives): without it Ray looks for the last
        # cluster `ray start` ran on this machine, and each question waits out a timeout.
        os.environ[API_SERVER_ENV] = runtime_env["env_vars"][API_SERVER_ENV] = f"http://{LOCALHOST}:{port}"
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            dashboard_host=LOCALHOST,
            dashboard_port=port,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            _system_config=local_system_config(LOCAL_WORKERS_SOFT_LIMIT),
        )


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]
