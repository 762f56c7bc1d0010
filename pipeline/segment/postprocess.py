"""Turn the inference actor's detections into output rows: RLE masks, category ids and names.

Runs on CPU tasks after the actor pool. Masks are encoded box by box with
`mrcnn.rle.masks_to_rle` (byte-identical to pasting into a full-size image, thresholding at 0.5 and
`pycocotools.mask.encode`, without ever building the full-size mask).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrcnn.categories import Category, category_of
from pipeline.cluster.shared_storage import StorageMarker
from pipeline.segment import output

MASK_THRESHOLD = 0.5


def rows_from_detections(
    batch: dict[str, np.ndarray], categories: tuple[Category, ...], model_uri: str
) -> pa.Table:
    """One output row (`pipeline.segment.output.SCHEMA`) per row of an inference batch.

    `batch` is what `pipeline.segment.inference.Segmenter` returns; the model's label `i` is
    `categories[i - 1]`. An error row keeps its path and error, null width/height when the image
    could not be read (0 from decode), and empty instance lists.
    """
    # Imported here: the job's driver imports this module for `finish_batch` and never encodes.
    import torch

    from mrcnn.rle import masks_to_rle

    columns: dict[str, list] = {name: [] for name in output.SCHEMA.names}
    for row, path in enumerate(batch["path"]):
        width, height = int(batch["width"][row]), int(batch["height"][row])
        error = str(batch["error"][row])
        boxes = np.asarray(batch["boxes"][row], np.float32).reshape(-1, 4)
        labels = np.asarray(batch["labels"][row], np.int64).reshape(-1)
        masks: list[str] = []
        if len(boxes):
            # Writable copies: Ray hands batches over read-only, zero-copy from the object store.
            probs = torch.tensor(np.asarray(batch["mask_probs"][row], np.float32))
            counts = masks_to_rle(probs.unsqueeze(1), torch.tensor(boxes), height, width, MASK_THRESHOLD)
            masks = [c.decode("ascii") for c in counts]
        found = [category_of(categories, label) for label in labels.tolist()]
        columns["path"].append(str(path))
        columns["width"].append(width or None)
        columns["height"].append(height or None)
        columns["category_ids"].append([c.id for c in found])
        columns["categories"].append([c.name for c in found])
        columns["scores"].append(np.asarray(batch["scores"][row], np.float32).reshape(-1).tolist())
        columns["boxes"].append(boxes.tolist())
        columns["masks"].append(masks)
        columns["error"].append(error or None)
        columns["model"].append(model_uri)
    return pa.table(columns, schema=output.SCHEMA)


def finish_batch(
    batch: dict[str, np.ndarray],
    *,
    categories: tuple[Category, ...],
    model_uri: str,
    output_uri: str,
    output_marker: StorageMarker | None = None,
) -> dict[str, np.ndarray]:
    """Encode and commit one inference batch; returns one row of counts for the driver.

    `output_marker`: for a local output on a cluster, the driver's marker, which this process must
    see before it writes (`pipeline.cluster.shared_storage`).
    """
    if output_marker is not None:
        output_marker.verify()
    table = rows_from_detections(batch, categories, model_uri)
    output.commit_part(table, output_uri)
    return {
        "images": np.array([table.num_rows]),
        "errors": np.array([table.num_rows - table.column("error").null_count]),
        "instances": np.array([pc.sum(pc.list_value_length(table.column("category_ids"))).as_py() or 0]),
    }
