"""Read the bytes of one input image (local or s3://), telling a missing input from a failing store.

Both decoders of images, bulk segmentation's (`pipeline.decode`) and training's
(`pipeline.train_data`), read through here: an input that is not there to read is a per-image
error (`InputMissing`: an error row, or an image left out of training), while a store that keeps
failing after the retries of `mrcnn.s3_retry` raises `mrcnn.storage.StorageError`, which stops
the job with one line (a re-run resumes) instead of recording a transient failure as a permanent
error row.
"""

from __future__ import annotations

from mrcnn import storage


class InputMissing(Exception):
    """An input that is not there to read (missing, a folder, or no permission): an error row."""


def read_input(uri: str) -> bytes:
    """The bytes of one input (one GET on S3); `InputMissing` when it cannot be read at all."""
    try:
        return storage.read_bytes(uri)
    except storage.ObjectMissing as error:
        raise InputMissing(f"cannot read: {error.reason}") from error
