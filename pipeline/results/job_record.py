"""What made an output's rows, for people to read: its job record (`pipeline.segment.provenance`)
and when it was written, and when the success marker (`pipeline.segment.output`) was."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow.fs as pafs

from mrcnn import storage
from pipeline.segment import output, provenance


@dataclass(frozen=True)
class Provenance:
    """The output's job record (None when it has none or it does not parse), the time it was
    written (the first run's start) and the time of the success marker (None: not complete)."""

    record: dict | None
    recorded_at: dt.datetime | None
    completed_at: dt.datetime | None


def read_provenance(predictions_uri: str) -> Provenance:
    """The `Provenance` of the output at `predictions_uri`."""
    recorded_at = _modified(storage.join(predictions_uri, provenance.JOB_FILE))
    try:
        record = provenance.read_record(predictions_uri)
    except ValueError:
        record = None  # not a record: the page says there is none
    completed_at = _modified(storage.join(predictions_uri, output.SUCCESS_FILE))
    return Provenance(record, recorded_at, completed_at)


def _modified(uri: str) -> dt.datetime | None:
    """The modification time of the file `uri`, None when there is none."""
    filesystem, path = storage.resolve(uri)
    try:
        info = filesystem.get_file_info(path)
    except OSError as error:
        raise storage.StorageError(f"{uri}: cannot read ({error})") from error
    return info.mtime if info.type == pafs.FileType.File else None
