"""Ray Data and Ray Train plumbing, in three wings:

- `pipeline.segment`: bulk segmentation on Ray Data: inputs and manifests, listing, decode,
  inference, post-process, the output with its done set and final check, provenance, actor sizing.
- `pipeline.train`: training on Ray Train: the run's config, data, the loop and its hooks, the
  optimizer, weight init, validation, the time budget, the run folder with checkpoints and export,
  metrics with TensorBoard, worker sizing, fault injection.
- `pipeline.cluster`: what both need from Ray: the Ray session, the private-Ray seam, Ray error
  unwrapping, GPU checks, placement and the wait for room, shared-storage checks, the job's
  console, the scheduling loop's idle backoff.

`segment` and `train` never import each other; both may import `cluster`, which imports neither.
"""
