"""The bulk-segmentation pipeline a Ray user writes from Ray Data's batch-inference documentation.

    PYTHONPATH=. python benchmarks/ray_docs_pipeline.py IMAGES OUTPUT MODEL [--batch-size 8]
        [--score-threshold 0.05]

The baseline of `benchmarks/segment_throughput.py`, written as Ray's examples are:
`ray.data.read_images` -> `map_batches` with a callable class that loads torchvision's Mask R-CNN
once per actor (here the project's model folder `MODEL`, a torchvision `MaskRCNN` with the same
weights the job uses), `concurrency=1` and Ray's default actor resources (one CPU) -> masks pasted
into the full image by the model, thresholded at 0.5 and encoded with `pycocotools.mask.encode`
inside the same call -> `write_parquet`. Ray starts on this machine with its defaults. Nothing
from `pipeline/` is used.
"""

from __future__ import annotations

import argparse

import numpy as np
import ray
import torch
from pycocotools import mask as mask_utils

from mrcnn.model_folder import load_model


class MaskRCNNPredictor:
    def __init__(self, model_dir: str, score_threshold: float):
        self.model, _ = load_model(model_dir)
        self.model.score_threshold = score_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        images = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in batch["image"]]
        with torch.inference_mode():
            predictions = self.model(images)
        masks, boxes, scores, labels = [], [], [], []
        for prediction in predictions:
            binary = (prediction["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
            encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
            masks.append([rle["counts"].decode("ascii") for rle in encoded])
            boxes.append(prediction["boxes"].numpy().tolist())
            scores.append(prediction["scores"].numpy().tolist())
            labels.append(prediction["labels"].numpy().tolist())
        return {"path": batch["path"], "boxes": boxes, "scores": scores, "labels": labels, "masks": masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images")
    parser.add_argument("output")
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.05)
    args = parser.parse_args()

    # A Ray of this process, as `ray.init()` starts when no cluster runs here; "local" never joins
    # a cluster that another user of this machine started (whose address file `ray.init()` reads).
    ray.init(address="local")
    dataset = ray.data.read_images(args.images, mode="RGB", include_paths=True)
    dataset = dataset.map_batches(
        MaskRCNNPredictor,
        fn_constructor_args=(args.model, args.score_threshold),
        batch_size=args.batch_size,
        concurrency=1,
    )
    dataset.write_parquet(args.output)


if __name__ == "__main__":
    main()
