"""Read the bytes of one input image (local or s3://), telling a missing input from a failing store.

Both decoders of images, bulk segmentation's (`pipeline.decode`) and training's
(`pipeline.train_data`), read through here: an input that is not there to read is a per-image
error (`InputMissing`: an error row, or an image left out of training), while other storage
failures (network, throttling after the S3 client's retries) raise, so that Ray retries the task.
"""

from __future__ import annotations

from mrcnn import storage

_UNREADABLE = {
    FileNotFoundError: "not found",
    IsADirectoryError: "a folder, not a file",
    PermissionError: "permission denied",
}


class InputMissing(Exception):
    """An input that is not there to read (missing, a folder, or no permission): an error row."""


def read_input(uri: str) -> bytes:
    """The bytes of one input; `InputMissing` when it does not exist or cannot be read at all."""
    filesystem, path = storage.resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        reason = next(text for kind, text in _UNREADABLE.items() if isinstance(error, kind))
        raise InputMissing(f"cannot read: {reason}") from error
