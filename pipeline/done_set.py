"""The done set: which inputs already have a row in the output, as 64-bit path hashes.

A re-run reads only the `path` column of the committed files, keeps their 64-bit hashes (8 bytes
per row) and the lister drops those inputs (`pipeline.listing`), so each input gets a row once over
any sequence of kills and re-runs. Two distinct paths share a 64-bit hash with probability about
n^2 / 2^65 (1e-7 for a million inputs, 3e-4 for a hundred million); such an input would be
skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from pipeline.output import scan_parts


def path_hashes(paths: Iterable[str]) -> np.ndarray:
    """`uint64[N]`: a 64-bit BLAKE2b hash of each path, stable across processes and runs."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
            for path in paths
        ),
        dtype=np.uint64,
    )


def committed_path_hashes(output_uri: str) -> np.ndarray:
    """Sorted unique `uint64[D]` hashes of the paths already committed under `output_uri`."""
    chunks = [path_hashes(batch.column(0).to_pylist()) for batch in scan_parts(output_uri, ["path"])]
    if not chunks:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate(chunks))
