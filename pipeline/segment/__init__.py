"""Bulk segmentation on Ray Data, from `--input` to the committed Parquet output.

- `inputs`: what `--input` names (folder, prefix, manifest) and the URIs it stands for.
- `listing`: the read stage, which streams those URIs minus the ones already done.
- `decode`: CPU tasks that read, decode and shrink images, bad ones becoming error rows.
- `inference`: the actor pool's callable class, one model per actor.
- `postprocess`: detections to rows (RLE masks, categories) and their commit.
- `output`: the output folder: schema, atomic part files, done set, reader, final check, success.
- `provenance`: `_JOB.json`, what made an output's rows.
- `actor_sizing`: what the actor pool asks Ray for, and whether it can ever run.
- `job`: the job's config and its run, stage by stage.
"""
