"""Default resources of a segmentation job: what a user gets without tuning flags."""

from __future__ import annotations

import os

from pipeline.segment.actor_sizing import (
    TASK_CPUS,
    actor_count,
    actor_cpus,
    actor_memory_bytes,
    local_ray_cpus,
)

GIB = 1 << 30
SMALL = actor_memory_bytes(min_size=128, max_size=128, batch_size=8)
R50 = actor_memory_bytes(min_size=800, max_size=1333, batch_size=4)


def test_a_local_ray_has_three_cpus_more_than_the_machine_and_one_single_thread_actor_per_core():
    cpus = local_ray_cpus()
    assert cpus == (os.cpu_count() or 1) + TASK_CPUS == (os.cpu_count() or 1) + 3
    actors = actor_count(None, cpus, 16 * GIB, SMALL, gpus=0, joined_cluster=False)
    assert actors == (os.cpu_count(), os.cpu_count())
    assert actor_cpus(None, cpus, actors=actors[0], gpus=0, joined_cluster=False) == 1


def test_memory_bounds_the_actors_of_a_large_model_which_then_take_more_threads():
    assert SMALL < 2 * GIB < R50 < 4 * GIB
    actors = actor_count(None, 18, 12 * GIB, R50, gpus=0, joined_cluster=False)
    assert actors == (int(12 * GIB // R50),) * 2 == (3, 3)
    assert actor_cpus(None, 18, actors=3, gpus=0, joined_cluster=False) == 5
    # Too little memory for even one: one actor all the same, not none.
    assert actor_count(None, 18, GIB, R50, gpus=0, joined_cluster=False) == (1, 1)


def test_several_local_actors_share_the_cpus_that_decode_leaves():
    assert actor_cpus(None, 19, actors=4, gpus=0, joined_cluster=False) == 4
    assert actor_cpus(None, 3, actors=4, gpus=0, joined_cluster=False) == 1


def test_gpu_actors_clusters_and_explicit_flags_keep_their_sizes():
    assert actor_count(None, 17, 64 * GIB, SMALL, gpus=1, joined_cluster=False) == (1, 1)
    assert actor_count(None, 64, 64 * GIB, SMALL, gpus=0, joined_cluster=True) == (1, 1)
    assert actor_count((2, 5), 17, 64 * GIB, SMALL, gpus=0, joined_cluster=False) == (2, 5)
    assert actor_cpus(None, 17, actors=1, gpus=1, joined_cluster=False) == 1
    assert actor_cpus(None, 64, actors=1, gpus=0, joined_cluster=True) == 1
    assert actor_cpus(2.5, 17, actors=1, gpus=0, joined_cluster=False) == 2.5
