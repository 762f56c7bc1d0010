"""Default resources of a segmentation job: what a user gets without tuning flags."""

from __future__ import annotations

import os

from pipeline.actor_sizing import actor_cpus, local_ray_cpus


def test_a_local_ray_has_a_cpu_more_than_the_machine_and_one_actor_takes_every_core():
    cpus = local_ray_cpus()
    assert cpus == (os.cpu_count() or 1) + 1
    assert actor_cpus(None, cpus, actors=1, gpus=0, joined_cluster=False) == os.cpu_count()


def test_several_local_actors_share_the_cpus_that_decode_leaves():
    assert actor_cpus(None, 17, actors=4, gpus=0, joined_cluster=False) == 4
    assert actor_cpus(None, 3, actors=4, gpus=0, joined_cluster=False) == 1


def test_gpu_actors_clusters_and_explicit_flags_keep_their_cpus():
    assert actor_cpus(None, 17, actors=1, gpus=1, joined_cluster=False) == 1
    assert actor_cpus(None, 64, actors=1, gpus=0, joined_cluster=True) == 1
    assert actor_cpus(2.5, 17, actors=1, gpus=0, joined_cluster=False) == 2.5
