"""What made an output's rows: `OUTPUT/_JOB.json`, written by a job's first run, checked by every re-run.

A re-run skips each input that already has a row, so an output means something only if all its
rows were made the same way. The settings compared are those that change what a row holds:
- the model's content: the sha256 of `weights.pt` and of `model.json` (preset, categories, input
  size); for `torchvision:<builder>`, the sha256 of its weights file in the torch hub cache, or,
  when the driver has no cached copy, the hash prefix that torchvision puts in the file's name
  (which torch.hub checks on download; a prefix matches the full hash it starts);
- `score_threshold`, `max_pixels`, and the output's `schema_version` (`pipeline.segment.output`).
Recorded, not compared: `amp`, the forward's precision as asked (`--amp`; "auto" is resolved on
each actor, by its hardware). Like the batch size, whose padding also moves a forward's low-order
digits, it changes scores and mask probabilities in their third significant digit, not which
model made a row; a re-run on other hardware or with another `--amp` completes an output.
Not compared, because they leave each row as it is: batch size, actors, CPUs and GPUs, rows per
file (file boundaries only), `--limit` and `--input` (which inputs get rows: an output may grow
with new inputs), the model URI (a copied folder is the same model; each row keeps the URI that
made it in `model`), and the project version (recorded, so that a reader can tell; an upgrade
alone does not block a resume, a schema change does through `schema_version`).

`_JOB.json` is written with `storage.write_bytes` (atomic) before any part file, so a killed first
run leaves it and a re-run with the same settings resumes. A job checks the record before it
starts Ray (`check_output`, read-only: a mismatch costs no start-up) and writes it only once the
output is known to be one every node sees (`record_output`, after `pipeline.cluster.shared_storage`), so
that a refused local path on a cluster keeps no record of a job that never ran.

An output that already has part files and no `_JOB.json` was written by a version that did not
record one: nothing tells what made it, so it is adopted with the current settings and a
one-line notice rather than refused. As for resuming, one job writes to an output at a time.

Hashing reads each model file once, streamed in chunks (`storage.read_chunks`): a weights file of
hundreds of MB on S3 costs its download time on the driver, never its size in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from importlib import metadata

from mrcnn import storage, torchvision_models
from mrcnn.errors import UserError
from mrcnn.model_spec import SPEC_FILE, WEIGHTS_FILE
from pipeline.segment import output

JOB_FILE = "_JOB.json"
PROJECT = "ray-mask-rcnn"
# The settings a re-run must share with the run that made the output, in the order they are named.
COMPARED = ("model_sha256", "model_json_sha256", "score_threshold", "max_pixels", "schema_version")
# torch.hub's names for cached weights end in `-<first hex digits of their sha256>.<ext>`.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


class ProvenanceMismatch(UserError):
    """The output holds rows made with other settings (one line, naming each difference)."""


def job_record(model_uri: str, score_threshold: float, max_pixels: int, amp: str = "auto") -> dict:
    """The `_JOB.json` content of a job with these settings; reads (hashes) the model's files."""
    if torchvision_models.is_torchvision(model_uri):
        # torchvision (its weights registry) is imported for these models only.
        cached = torchvision_models.cache_path(torchvision_models.builder_of(model_uri))
        if os.path.exists(cached):
            weights_hash = _sha256(cached)
        else:
            found = _HASH_IN_NAME.search(os.path.basename(cached))
            weights_hash = found.group(1) if found else None
        spec_hash = None
    else:
        weights_hash = _sha256(storage.join(model_uri, WEIGHTS_FILE))
        spec_hash = _sha256(storage.join(model_uri, SPEC_FILE))
    return {
        "model": model_uri,
        "model_sha256": weights_hash,
        "model_json_sha256": spec_hash,
        "score_threshold": score_threshold,
        "max_pixels": max_pixels,
        "amp": amp,
        "schema_version": output.SCHEMA_VERSION,
        "project_version": project_version(),
    }


def read_record(output_uri: str) -> dict | None:
    """`OUTPUT/_JOB.json` as written; None when the output has none. Raises `ValueError` when the
    file is not a JSON object, `storage.StorageError` when it cannot be read."""
    try:
        data = storage.read_bytes(storage.join(output_uri, JOB_FILE))
    except storage.ObjectMissing:
        return None
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    return record


def check_output(output_uri: str, record: dict) -> dict | None:
    """The `OUTPUT/_JOB.json` record when its settings match `record`; None when there is none.

    Reads only: a job checks before it starts Ray, so that a mismatch costs no start-up, and
    writes (`record_output`) once it knows the output is one every node sees. Raises
    `ProvenanceMismatch` when the settings differ and `storage.StorageError` when the output
    cannot be read.
    """
    try:
        previous = read_record(output_uri)
    except ValueError as error:
        uri = storage.join(output_uri, JOB_FILE)
        raise ProvenanceMismatch(f"{uri}: not a job record ({error}); write to a new --output") from error
    if previous is None:
        return None
    differences = [name for name in COMPARED if not _same(name, previous.get(name), record[name])]
    if differences:
        named = ", ".join(
            f"{name} {_shown(previous.get(name))} (now {_shown(record[name])})" for name in differences
        )
        raise ProvenanceMismatch(
            f"{output_uri} holds rows made with other settings: {named}; re-run with the same "
            f"settings to complete it, or write to a new --output"
        )
    return previous


def record_output(output_uri: str, record: dict) -> str | None:
    """Write `record` as `OUTPUT/_JOB.json` of an output that `check_output` found without one.

    Returns a one-line notice when the output already has part files (adopted, see above).
    Raises `storage.StorageError` when the output cannot be read or written.
    """
    _, parts = output.part_files(output_uri)
    storage.write_bytes(storage.join(output_uri, JOB_FILE), (json.dumps(record, indent=2) + "\n").encode())
    if parts:
        return (
            f"{output_uri} has {len(parts)} files from a version that recorded no settings; "
            f"they are taken as made with these ({JOB_FILE} written)"
        )
    return None


def project_version() -> str:
    """This project's version: the installed distribution's, else pyproject.toml's beside the code."""
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        pass
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, "rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _same(name: str, before, now) -> bool:
    if name == "model_sha256" and isinstance(before, str) and isinstance(now, str) and before and now:
        return before.startswith(now) or now.startswith(before)
    return before == now


def _shown(value) -> str:
    """A value for the one-line message: hashes cut to 12 hex digits, enough to tell them apart."""
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else str(value)


def _sha256(uri: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.read_chunks(uri):
        digest.update(chunk)
    return digest.hexdigest()
