"""What people do with a segmentation output once it exists: look at it and take it elsewhere.

Reads the folder `pipeline.segment.output` owns, always by streaming its Parquet columns: the
statistics and HTML report (`jobs.report`), overlay pictures of chosen rows (`jobs.render`) and
COCO files for other tools and for training the next model (`jobs.export`). No Ray here: these run
in one plain process, on a laptop or next to the bucket.
"""
