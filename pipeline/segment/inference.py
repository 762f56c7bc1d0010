"""Batched Mask R-CNN inference: the callable class of the actor pool, one model per actor.

`Segmenter.__init__` loads the model once (`mrcnn.model_folder.load_model`, from the spec the driver
read), with
`paste_masks = False`: the actor returns each detection's 28x28 mask probabilities and its box in
pixels of the original image, and the RLE encoding happens on CPU tasks downstream
(`pipeline.segment.postprocess`), not on the actor that holds the accelerator. Per detection that is
28 * 28 * 4 bytes = 3 KB (float32, kept exact so the RLEs equal those of a plain loop in the same
precision), against height * width bytes for a pasted mask.

Threads: Ray sets `OMP_NUM_THREADS` to an actor's `num_cpus` (1 by default), so torch would run
single-threaded whatever the actor reserved; we set torch's thread count to the CPUs the actor
reserved, on purpose.

Precision (`precision`, the job's `--amp`): "auto" runs the forward under bf16 autocast where the
actor's hardware computes bf16 natively (a GPU with bf16, a CPU with AMX or AVX512-BF16), fp16
on an older GPU, float32 elsewhere (`mrcnn.precision.inference_precision`, resolved on the actor:
a cluster's nodes may differ). Pixel coordinates (anchors, box decoding, box regression) stay
float32 as the model keeps them; bf16 halves the forward's time on a CPU with AMX and moves
scores and mask probabilities in their third significant digit (BENCHMARKS.md, "bf16 on CPUs with
AMX"). `--amp off` gives float32 everywhere, the numbers of a plain float32 loop.

An actor that Ray gave a GPU but that sees no CUDA device fails to start, with one line naming
its node and the cause (`pipeline.cluster.gpu.require_cuda`), instead of running on the CPU.

Images of both orientations in one batch would pad to a square of the larger sides; when that
wastes enough pixels the batch runs as one forward per orientation (`mrcnn.batching`; on a GPU
only batches of 8 or more, whose halves still fill it), and the rows come out in their input
order all the same.

Error rows (from decode) pass through untouched, with no detections.

torch and the model's modules are imported inside the methods, which run on the actors only: the
job's driver imports this module to hand the class to Ray Data and must not pay torch's and
torchvision's import first (about 3 s of its start-up on a small machine, BENCHMARKS.md "Start-up
of the whole command and one actor per core").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mrcnn.batching import input_size, min_batch_to_split, orientation_groups
from pipeline.cluster.gpu import require_cuda

if TYPE_CHECKING:
    import torch

    from mrcnn.model_spec import ModelSpec

# The job's `--amp` values (`mrcnn.precision.PRECISIONS` and "auto"), here so that the driver,
# which parses the flag, need not import torch.
PRECISION_CHOICES = ("auto", "bf16", "fp16", "off")


class Segmenter:
    """Segment batches of decoded images with the model at `model_uri`.

    Args:
        model_uri: a model folder (local or s3://) or `torchvision:<builder>`.
        score_threshold: detections scoring at or below it are dropped (torchvision's rule).
        num_threads: torch CPU threads of this actor (the CPUs it reserved).
        use_gpu: run on CUDA (the actor was given a GPU); no CUDA device here is an error
            (`pipeline.cluster.gpu.GpuUnavailableError`), not a fallback to the CPU.
        group_by_orientation: run landscape and portrait images as separate forwards when that
            saves padded pixels (`mrcnn.batching.orientation_groups`); False: one forward per batch.
        precision: one of `PRECISION_CHOICES`; "auto" is resolved here, for this actor's device.
        spec: the model's spec as the job's driver read it (None: read here, from `model_uri`).
    """

    def __init__(
        self,
        model_uri: str,
        score_threshold: float,
        num_threads: int,
        use_gpu: bool,
        group_by_orientation: bool = True,
        precision: str = "auto",
        spec: ModelSpec | None = None,
    ):
        import torch

        from mrcnn.model_folder import load_model
        from mrcnn.precision import inference_precision

        torch.set_num_threads(max(1, num_threads))
        if use_gpu:
            require_cuda()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model, spec = load_model(model_uri, device=self.device, spec=spec)
        self.model.paste_masks = False
        self.model.score_threshold = score_threshold
        self.min_size, self.max_size = spec.min_size, spec.max_size
        self.group_by_orientation = group_by_orientation
        self.precision = inference_precision(self.device, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add the detections of each row of a decoded batch (see `pipeline.segment.decode.decode_batch`).

        Returns the batch without `image`, plus per row (D detections, sorted by score, descending):
            boxes: float32[D, 4] x1, y1, x2, y2 in pixels of the displayed `width x height` image.
            scores: float32[D].
            labels: int32[D], the model's labels 1..K.
            mask_probs: float32[D, 28, 28] mask probabilities inside each box.
        Error rows get D = 0.
        """
        import torch

        count = len(batch["path"])
        boxes = [np.zeros((0, 4), np.float32)] * count
        scores = [np.zeros(0, np.float32)] * count
        labels = [np.zeros(0, np.int32)] * count
        mask_probs = [np.zeros((0, 28, 28), np.float32)] * count
        rows = [row for row in range(count) if not batch["error"][row]]
        if rows:
            images = [self._tensor(batch["image"][row]) for row in rows]
            predictions = self._predict(images)
            for row, image, prediction in zip(rows, images, predictions, strict=True):
                order = torch.argsort(prediction["scores"], descending=True, stable=True)
                # The model saw the image at its input size; boxes go back to the displayed size.
                scale = torch.tensor(
                    [batch["width"][row] / image.shape[2], batch["height"][row] / image.shape[1]] * 2,
                    dtype=torch.float32,
                    device=self.device,
                )
                boxes[row] = _numpy(prediction["boxes"][order].float() * scale)
                scores[row] = _numpy(prediction["scores"][order].float())
                labels[row] = _numpy(prediction["labels"][order]).astype(np.int32)
                mask_probs[row] = _numpy(prediction["mask_probs"][order, 0].float())
        return {
            "path": batch["path"],
            "width": batch["width"],
            "height": batch["height"],
            "error": batch["error"],
            "boxes": boxes,
            "scores": scores,
            "labels": labels,
            "mask_probs": mask_probs,
        }

    def _predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The model's predictions for `images` (float32[3, h, w] each), in their order."""
        import torch

        from mrcnn.precision import autocast

        groups = [list(range(len(images)))]
        if self.group_by_orientation:
            sizes = [input_size(*image.shape[1:], self.min_size, self.max_size) for image in images]
            groups = orientation_groups(sizes, min_batch=min_batch_to_split(self.device.type))
        predictions: list[dict[str, torch.Tensor]] = [{}] * len(images)
        with torch.inference_mode(), autocast(self.device, self.precision):
            for group in groups:
                for index, prediction in zip(group, self.model([images[i] for i in group]), strict=True):
                    predictions[index] = prediction
        return predictions

    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8[h, w, 3] -> float32[3, h, w] in 0..1 on the model's device."""
        import torch

        # A copy: Ray hands batches over as read-only views of the object store.
        image = torch.tensor(pixels, device=self.device)
        return image.permute(2, 0, 1).float().div_(255)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
