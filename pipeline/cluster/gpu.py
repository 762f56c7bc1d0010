"""GPU requests and the check that a process Ray gave a GPU can really use one.

A number of GPUs in the flags is requested as given on a cluster the job joined, even when the
cluster holds no GPU yet: a cluster whose GPU nodes scale from zero holds none when the job
starts, and only a pending request for one makes its autoscaler launch a GPU node. `auto` (the
segmentation job's default) asks the cluster instead: GPUs when a node has them or a node type of
its autoscaler does (`pipeline.cluster.placement.auto_gpus`), CPUs otherwise. The job's own local Ray is
the exception: it is this machine, it cannot grow, and it uses the GPUs it has (none: CPU actors
and workers), whatever the flag.

A process that Ray gave a GPU and in which torch sees no CUDA device must never fall back to the
CPU silently (a GPU fleet would run at CPU speed, billed as GPUs): `require_cuda` raises a
`GpuUnavailableError` whose one-line message names the node and the likely cause.
"""

from __future__ import annotations

import os
import socket

from mrcnn.errors import UserError


class GpuUnavailableError(UserError):
    """Ray gave this process a GPU, but torch cannot use one here; the message is one line."""


AUTO = "auto"


def gpus_to_request(gpus: float | str, joined_cluster: bool, cluster_gpus: float) -> float:
    """GPUs to ask Ray for per actor or worker when the flags say `gpus`.

    Args:
        gpus: what the flag asks for (0: CPU only); `AUTO` on a cluster the job joined must have
            been resolved by `pipeline.cluster.placement.auto_gpus` first.
        joined_cluster: the job runs on a cluster it joined (`RAY_ADDRESS`), which may add GPU
            nodes when asked, rather than on a Ray this process started or was handed.
        cluster_gpus: GPUs the Ray cluster holds now.
    """
    if gpus == AUTO:
        if joined_cluster:
            raise ValueError("gpus_to_request: resolve --gpus-per-actor auto on a cluster first")
        return 1.0 if cluster_gpus > 0 else 0.0
    if gpus <= 0:
        return 0.0
    if joined_cluster or cluster_gpus > 0:
        return gpus
    return 0.0


def require_cuda() -> None:
    """Raise `GpuUnavailableError` unless torch sees a CUDA device in this process."""
    import torch

    if torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        cause = f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch on it"
    else:
        cause = (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible!r}): check the NVIDIA driver and that the node's image "
            f"exposes the GPU (nvidia-smi)"
        )
    raise GpuUnavailableError(f"{node_description()} was given a GPU by Ray but {cause}")


def node_description() -> str:
    """`node <ip> (<host>, Ray node <id prefix>)` of this process, for error messages."""
    import ray

    if not ray.is_initialized():  # a plain process: the host name alone
        return f"host {socket.gethostname()}"
    node_id = ray.get_runtime_context().get_node_id()[:12]
    address = ray.util.get_node_ip_address()
    return f"node {address} ({socket.gethostname()}, Ray node {node_id})"
