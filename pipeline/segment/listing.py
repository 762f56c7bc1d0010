"""Stream the input URIs of a segmentation job into Ray Data, skipping the inputs already done.

`PathDatasource` has a single read task, a generator that yields blocks of `rows_per_block` paths
(`pipeline.segment.inputs.iter_inputs`, in listing order) as each chunk of `FILTER_CHUNK` listed inputs
has been checked against the done set, and the driver never holds the listing. Ray Data gathers
those blocks up to the dataset's target block size (`pipeline.segment.job.TARGET_MAX_BLOCK_SIZE`,
~15,000 paths) before it hands them on; the segmentation dataset then cuts them back into batches,
one decode task each. Ray Data runs read tasks as streaming generators and pauses them when the
stages downstream fall behind (backpressure), which keeps memory bounded. One lister is enough:
each ListObjectsV2 request returns 1,000 keys, so even a cluster segmenting 1,000 images a second
needs one request a second. The read task asks for no CPU, so the long-lived lister never keeps a
decode task from being scheduled, and it is not fused with the decode stage (different resources).

Resume: the read task receives the sorted 64-bit hashes of the paths already in the output
(`pipeline.segment.output.committed_path_hashes`, shared through the object store: 8 bytes per done input)
and drops those inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.segment.inputs import MANIFEST_COLUMN, InputSpec, iter_inputs
from pipeline.segment.output import path_hashes

# Inputs checked against the done set at once (vectorised lookup), independent of the block size.
FILTER_CHUNK = 1000


class PathDatasource(Datasource):
    """The inputs of `spec` not yet done, as blocks of `rows_per_block` rows with one column `path`.

    `done` is an object reference to a sorted `uint64[D]` array of path hashes (or None).
    """

    def __init__(self, spec: InputSpec, rows_per_block: int, done: ray.ObjectRef | None = None):
        super().__init__()
        self._spec = spec
        self._rows_per_block = rows_per_block
        self._done = done

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        spec, rows_per_block, done = self._spec, self._rows_per_block, self._done

        def read() -> Iterator[pa.Table]:
            done_hashes = ray.get(done) if done is not None else np.zeros(0, np.uint64)
            pending: list[str] = []
            for chunk in _chunks(iter_inputs(spec), FILTER_CHUNK):
                pending.extend(_not_done(chunk, done_hashes))
                while len(pending) >= rows_per_block:
                    yield _block(pending[:rows_per_block])
                    pending = pending[rows_per_block:]
            if pending:
                yield _block(pending)

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)]


def _chunks(uris: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for uri in uris:
        chunk.append(uri)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _not_done(paths: list[str], done_hashes: np.ndarray) -> list[str]:
    """The paths whose hash is not in the sorted `done_hashes`."""
    if not done_hashes.size:
        return paths
    hashes = path_hashes(paths)
    where = np.minimum(np.searchsorted(done_hashes, hashes), done_hashes.size - 1)
    done = done_hashes[where] == hashes
    return [path for path, is_done in zip(paths, done, strict=True) if not is_done]


def _block(paths: list[str]) -> pa.Table:
    return pa.table({MANIFEST_COLUMN: pa.array(paths, pa.string())})
