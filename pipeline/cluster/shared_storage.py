"""Accept a local path on a Ray cluster only when every node sees the same files there.

On a cluster, `/data/out` names a folder on each node's own disk unless a shared filesystem (NFS,
EFS, Lustre...) is mounted at that path on every node: Parquet parts, checkpoints and metrics
would silently land on whichever node a task ran on, and a model or an input folder would be
missing or different on some nodes. `s3://` URIs need no check.

The check is the one Ray Train makes of its storage (`ray/train/v2/_internal/execution/
storage.py`): the driver writes a marker file, a task on each alive node reads it.

- Paths a job writes (`--output`): the driver writes `.mrcnn-storage-check` (a fresh random token)
  into the folder. `check_local_paths` reads it on every node alive at the start; the
  `StorageMarker` it returns travels with the job, and every process that writes there
  (`StorageMarker.verify`) reads it again before its first write, so that a node the autoscaler
  adds later cannot write to a disk of its own either.
- Paths a job only reads (`--model`, `--input`, training data): each alive node compares the
  driver's fingerprint of them: a file's size and the hash of its first MiB; for a folder, the
  sizes of up to `SAMPLE_FILES` files in it. Identical copies at the same path on every node pass,
  which is as good as a shared mount for reading.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow.fs as pafs

from mrcnn import storage
from mrcnn.errors import UserError

MARKER_NAME = ".mrcnn-storage-check"
SAMPLE_FILES = 8
HEAD_BYTES = 1 << 20
# Seconds to wait for every node's answer: the check tasks need no CPU, only a worker process.
CHECK_TIMEOUT_S = 120.0
ADVICE = "use s3:// or a filesystem mounted at the same path on every node"

# Markers this process has already verified: one read per writer process, not one per write.
_verified: set[tuple[str, str]] = set()


class SharedStorageError(UserError):
    """A local path that some node of the cluster does not see as the driver does; one line."""


@dataclass(frozen=True)
class StorageMarker:
    """The marker the driver wrote into a local folder a job writes to (see the module docstring)."""

    flag: str
    folder: str
    token: str

    def verify(self) -> None:
        """Raise `SharedStorageError` unless this process sees the driver's marker in the folder."""
        key = (self.folder, self.token)
        if key in _verified:
            return
        if _read_marker(self.folder) != self.token:
            from pipeline.cluster.gpu import node_description

            raise SharedStorageError(
                f"{self.flag} {self.folder} is a local path that {node_description()} does not see "
                f"as the driver does (its marker file is missing there): {ADVICE}"
            )
        _verified.add(key)


def check_local_paths(
    writable: Mapping[str, str], readable: Mapping[str, str]
) -> dict[str, StorageMarker]:
    """Check, on every alive node of the connected Ray cluster, the local paths among the URIs.

    `writable` and `readable` map a flag name (for messages) to a URI; only local paths are
    checked (`s3://`, `torchvision:<builder>` and None are skipped).
    Raises `SharedStorageError` naming the first path and node that differ. Returns the marker of
    each local writable path, to be verified by the processes that write there.
    """
    import ray

    markers = {flag: _write_marker(flag, uri) for flag, uri in writable.items() if is_local_path(uri)}
    fingerprints = {flag: (uri, fingerprint(uri)) for flag, uri in readable.items() if is_local_path(uri)}
    if not markers and not fingerprints:
        return markers
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return markers
    probe = ray.remote(num_cpus=0, max_retries=0)(_differences)
    pending = {
        probe.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False
            )
        ).remote(list(markers.values()), fingerprints): node
        for node in nodes
    }
    ready, missing = ray.wait(list(pending), num_returns=len(pending), timeout=CHECK_TIMEOUT_S)
    for ref in ready:
        differences = ray.get(ref)
        if differences:
            node = pending[ref]
            raise SharedStorageError(
                f"{differences[0]} on node {node['NodeManagerAddress']}, one of the cluster's "
                f"{len(nodes)} nodes: {ADVICE}"
            )
    if missing:
        addresses = ", ".join(pending[ref]["NodeManagerAddress"] for ref in missing)
        raise SharedStorageError(
            f"could not check the local paths on node(s) {addresses} within {CHECK_TIMEOUT_S:g} s; "
            f"{ADVICE}"
        )
    return markers


def is_local_path(uri: str | None) -> bool:
    """True for a path on a node's filesystem (`/data/x`, `file:///data/x`, `rel/x`), not a URI."""
    if not uri:
        return False
    first = uri.split("/", 1)[0]
    return uri.startswith("file://") or ":" not in first


def fingerprint(uri: str) -> dict:
    """What identifies the file or folder at local `uri` across nodes (see the module docstring)."""
    filesystem, path = storage.resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {"size": info.size, "head": _head_hash(filesystem, path)}
    if info.type == pafs.FileType.Directory:
        sample = itertools.islice(storage.iter_files(uri), SAMPLE_FILES)
        return {"files": {file: filesystem.get_file_info(file).size for file in sample}}
    return {"missing": True}


def _differences(markers: list[StorageMarker], fingerprints: dict[str, tuple[str, dict]]) -> list[str]:
    """On one node: a line for each path this node does not see as the driver does."""
    lines = [
        f"{marker.flag} {marker.folder} (a local folder the job writes) does not hold the driver's "
        f"marker file"
        for marker in markers
        if _read_marker(marker.folder) != marker.token
    ]
    for flag, (uri, expected) in fingerprints.items():
        if fingerprint(uri) != expected:
            lines.append(f"{flag} {uri} (read by the job) differs from the driver's copy or is missing")
    return lines


def _write_marker(flag: str, uri: str) -> StorageMarker:
    filesystem, folder = storage.resolve(uri)
    filesystem.create_dir(folder, recursive=True)
    token = secrets.token_hex(16)
    storage.write_bytes(storage.join(folder, MARKER_NAME), token.encode())
    return StorageMarker(flag, folder, token)


def _read_marker(folder: str) -> str | None:
    try:
        return storage.read_bytes(storage.join(folder, MARKER_NAME)).decode()
    except storage.StorageError:
        return None


def _head_hash(filesystem: pafs.FileSystem, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return hashlib.sha256(stream.read(HEAD_BYTES)).hexdigest()
