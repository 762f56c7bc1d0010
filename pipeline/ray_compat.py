"""Every use of a private or undocumented Ray name in the project, behind one seam.

Written for Ray 2.60. Each entry says what it does, why no public API serves, and what to watch
upstream. `check_ray_version` fails loudly when a name this module needs is gone, so that a Ray
upgrade breaks a job at its start with one line instead of making a fix silently do nothing.
"""

from __future__ import annotations

import math
import os

import ray
from ray.train.torch import TorchConfig

WRITTEN_FOR = "2.60"


class RayCompatError(RuntimeError):
    """This Ray lacks a name the project relies on; the message is one line."""


def _torch_backend_class() -> type:
    """Ray Train's torch backend class (`ray.train.torch.config._TorchBackend`, private).

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
        raise RayCompatError(
            f"Ray {ray.__version__} has no ray.train.torch.config._TorchBackend (this project was "
            f"written for Ray {WRITTEN_FOR}): pin ray=={WRITTEN_FOR}.0 or update pipeline/ray_compat.py"
        )
    return backend


def cuda_checked_torch_config() -> TorchConfig:
    """A `TorchConfig` whose workers run `pipeline.gpu.require_cuda` before the process group."""
    base = _torch_backend_class()

    class CudaCheckedBackend(base):
        def on_start(self, worker_group, backend_config):
            from pipeline.gpu import require_cuda

            worker_group.execute(require_cuda)
            super().on_start(worker_group, backend_config)

    class CudaCheckedTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return CudaCheckedBackend

    return CudaCheckedTorchConfig()


# Ray Train's controller waits this long for a worker group's placement before it counts a
# failure and tries again. The variable is defined in `ray/train/v2/_internal/constants.py`
# (`WORKER_GROUP_START_TIMEOUT_S_ENV_VAR`, default 60) and read in the controller's process: set
# it for the whole cluster (e.g. on `ray start`) to change it; the driver reads the same variable
# to turn a time budget into a number of tries. Watch: ray-project/ray `train/v2/_internal/constants.py`.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_GROUP_START_TIMEOUT_S = 60.0


def worker_group_start_retries(timeout_s: float) -> int:
    """`FailureConfig.controller_failure_limit` for giving up on placement after about `timeout_s`.

    Ray Train 2.60 counts each timed-out placement of the worker group (and each failed start)
    as a controller failure, retried without limit by default (-1): a run that asks for GPUs no
    node has, and no autoscaler can add, would wait forever. `controller_failure_limit` is a
    documented DeveloperAPI field; the per-try timeout behind it is the private variable above.
    """
    per_try = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(0, math.ceil(timeout_s / per_try) - 1)


def is_worker_group_start_timeout(error: BaseException) -> bool:
    """True for Ray Train's `WorkerGroupStartupTimeoutError` (defined in `ray.train.v2._internal`).

    Compared by name: the class is private, and an upgrade that moves it must not break the import
    of this module. Watch: ray-project/ray `train/v2/_internal/exceptions.py`.
    """
    return type(error).__name__ == "WorkerGroupStartupTimeoutError"


def check_ray_version() -> None:
    """Raise `RayCompatError` (one line) when a private name used above is missing."""
    _torch_backend_class()
    from ray.train.v2._internal import constants, exceptions

    for module, name in (
        (constants, "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR"),
        (exceptions, "WorkerGroupStartupTimeoutError"),
    ):
        if not hasattr(module, name):
            raise RayCompatError(
                f"Ray {ray.__version__} has no {module.__name__}.{name} (this project was written "
                f"for Ray {WRITTEN_FOR}): pin ray=={WRITTEN_FOR}.0 or update pipeline/ray_compat.py"
            )
    if constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR != WORKER_GROUP_START_TIMEOUT_ENV:
        raise RayCompatError(
            f"Ray {ray.__version__} reads the worker group start timeout from another variable than "
            f"{WORKER_GROUP_START_TIMEOUT_ENV}: update pipeline/ray_compat.py"
        )
