"""Start a model from another model's weights: every tensor that fits, and shared classes' rows.

Fine-tuning from COCO on a dataset of other categories: the backbone, RPN and heads fit as they
are, but the class-specific layers (the box classifier, the per-class box regression and the
per-class mask logits) have one row (four for box regression) per class. Where a category of the
dataset has the name of one of the source's classes (`person`, `dog`), its rows are copied from
that class's rows; the background row is copied too; other categories (`widget`) keep their
fresh initialisation.
"""

from __future__ import annotations

import torch

# Class-specific tensors of a Mask R-CNN state_dict -> rows per class along dim 0.
PREDICTOR_ROWS: dict[str, int] = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
    "roi_heads.mask_predictor.mask_fcn_logits.weight": 1,
    "roi_heads.mask_predictor.mask_fcn_logits.bias": 1,
}


def shared_labels(source_names: list[str], target_names: list[str]) -> dict[int, int]:
    """Target label -> source label for the classes both name alike (case and spaces ignored).

    Names are indexed by label, 0 being the background (which always maps to 0). Names that occur
    more than once in the source (torchvision's COCO list repeats "N/A") are not matched.
    """
    def key(name: str) -> str:
        return " ".join(name.lower().split())

    counts: dict[str, int] = {}
    for name in source_names[1:]:
        counts[key(name)] = counts.get(key(name), 0) + 1
    source = {key(name): label for label, name in enumerate(source_names) if label and counts[key(name)] == 1}
    mapping = {0: 0}
    for label, name in enumerate(target_names):
        if label and key(name) in source:
            mapping[label] = source[key(name)]
    return mapping


def transferred_state(
    own: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    labels: dict[int, int] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """What to load into a model whose state_dict is `own` from the weights `source`.

    Returns (state, rows): `state` holds every tensor of `source` whose name and shape match
    `own` and, given `labels` (target label -> source label, see `shared_labels`), the
    class-specific tensors of `own` with the mapped classes' rows taken from `source`; `rows` is
    the number of classes copied that way (0 when the predictors fit as a whole or do not fit).
    """
    state = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    copied: set[int] = set()
    for name, per_class in PREDICTOR_ROWS.items():
        if not labels or name in state or name not in own or name not in source:
            continue
        mine, theirs = own[name], source[name]
        if mine.shape[1:] != theirs.shape[1:]:
            continue
        merged = mine.clone()
        for target, origin in labels.items():
            if (origin + 1) * per_class <= len(theirs) and (target + 1) * per_class <= len(mine):
                merged[target * per_class : (target + 1) * per_class] = theirs[
                    origin * per_class : (origin + 1) * per_class
                ]
                copied.add(target)
        state[name] = merged
    return state, len(copied - {0})
