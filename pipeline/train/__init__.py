"""Training on Ray Train, from COCO annotations to an exported model folder.

- `config`: the run's `TrainConfig` (flags) and `TrainPlan` (decided at its start), built once.
- `data`: training and validation data on Ray Data, decoded images and targets.
- `loop`: the per-worker training function: `Trainer` runs forward, backward and step.
- `hooks`: everything else around the steps (budget, metrics, validation, checkpoints).
- `optimizer`: SGD or AdamW and the learning-rate schedule.
- `weight_init`: where weights start and which of them train.
- `validation`: sharded validation scored once with COCOeval.
- `budget`: how many steps fit a time budget.
- `run_folder`: the output folder's layout, the run's identity, checkpoints and the export.
- `metrics`: `metrics.jsonl`, TensorBoard, the progress lines.
- `workers`: CPUs per training worker.
- `fault_injection`: the tests' worker that dies on purpose, as a hook.
- `job`: the run as a short sequence of steps on Ray Train.
"""
