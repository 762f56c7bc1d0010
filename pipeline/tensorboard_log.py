"""TensorBoard event files of a training run, under `OUTPUT/tensorboard/`, local or s3://.

`tensorboard --logdir OUTPUT/tensorboard` (TensorBoard reads s3:// too) shows the curves: the
loss terms, lr and images/s of every logged step (`train/...`) and the validation APs (`val/...`).
The rank-0 worker writes with torch's `SummaryWriter` into a local folder and copies each event
file whole to the output after every flush, so that one path serves local disks and object
stores alike (an S3 object cannot be appended to). A run resumed from a checkpoint at step T
writes a new event file whose first event purges the old file's events after T, so TensorBoard
shows each step once.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

from mrcnn import storage

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Scalars of one process of a run, mirrored to `uri` (a folder) at every `flush`.

    Args:
        uri: the run's `OUTPUT/tensorboard` folder.
        resumed_step: the step of the checkpoint this process resumed from; events of earlier
            processes after it are purged. None for a run's first process.
    """

    def __init__(self, uri: str, resumed_step: int | None = None) -> None:
        self.uri = uri
        self._local = tempfile.mkdtemp(prefix="mrcnn-tensorboard-")
        purge = None if resumed_step is None else resumed_step + 1
        self._writer = SummaryWriter(self._local, purge_step=purge, flush_secs=3600)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (tag -> number) at `step`."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write pending events and copy the event files to `uri`."""
        self._writer.flush()
        for name in sorted(os.listdir(self._local)):
            with open(os.path.join(self._local, name), "rb") as file:
                storage.write_bytes(storage.join(self.uri, name), file.read())

    def close(self) -> None:
        """Flush, copy, and remove the local folder."""
        self.flush()
        self._writer.close()
        shutil.rmtree(self._local, ignore_errors=True)
