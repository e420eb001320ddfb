"""The time estimates' arithmetic (cnngp.engine.timing): the schedule of tiles on workers
against brute force, stage sums against hand-computed totals, and a real timing's
structure. No assertion here depends on how fast this machine is."""

from __future__ import annotations

import numpy as np
import pytest

import cnngp
from cnngp.engine import timing
from cnngp.engine.gram import GramPlan, tile_plan


def _greedy_brute(tasks, workers, start):
    """The same list schedule, simulated step by step without a heap."""
    free = [start] * workers
    end = start
    for t in tasks:
        w = min(range(workers), key=lambda i: (free[i], i))
        free[w] += t
        end = max(end, free[w])
    return end


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_schedule_matches_a_step_by_step_list_schedule(workers):
    rng = np.random.default_rng(workers)
    for _ in range(20):
        tasks = list(rng.uniform(0.1, 5.0, size=rng.integers(1, 12)))
        assert timing.schedule_seconds(tasks, workers, 1.5) == pytest.approx(_greedy_brute(tasks, workers, 1.5))


def test_schedule_bounds():
    tasks = [3.0, 1.0, 1.0, 1.0]
    assert timing.schedule_seconds(tasks, 1) == pytest.approx(6.0)
    assert timing.schedule_seconds(tasks, 2) == pytest.approx(3.0)  # 3 | 1+1+1
    assert timing.schedule_seconds(tasks, 10) == pytest.approx(3.0)  # the longest task
    assert timing.schedule_seconds([], 2, 4.0) == pytest.approx(4.0)


def _rates(pair=0.01, image=0.002, warm=0.5, start=2.0):
    return timing.Rates(pair, image, warm, start, 2, 16, None)


def test_in_process_estimate_is_the_sum_of_stages_and_the_start():
    stages = [timing.Stage("train", 80), timing.Stage("test", 50, 80)]
    est = timing.estimate(_rates(), stages)
    want = 2.0 + 0.5 + (80 * 81 // 2) * 0.01 + 80 * 0.002 + 50 * 80 * 0.01 + 130 * 0.002
    assert est.seconds == pytest.approx(want)
    assert stages[0].pairs == 3240 and stages[1].pairs == 4000 and stages[1].images == 130
    text = est.describe()
    assert "3,240 pairs" in text and "4,000 pairs" in text


def test_dask_estimate_schedules_the_tiles():
    """32 images in tiles of 16 on 2 workers: tiles of 136, 256, 136 pairs in the plan's order;
    one worker does both diagonal tiles, so the work takes 272 pairs' time, not 528 / 2."""
    tiles = [t.pairs for t in tile_plan(32, None, 16)]
    assert tiles == [136, 256, 136]
    r = _rates(pair=0.01, image=0.0, warm=0.0, start=0.0)
    est = timing.estimate(r, [timing.Stage("kernel", 32)], workers=2, tile_pairs=[tiles])
    # + the cluster's start and stop and a cold worker's start (at least the typical one)
    start = timing.CLUSTER_START_SECONDS + timing.TYPICAL_START_SECONDS + timing.CLUSTER_STOP_SECONDS
    assert est.seconds == pytest.approx(start + 2.72)
    warm = timing.estimate(r, [timing.Stage("kernel", 32)], workers=2, tile_pairs=[tiles], cold_workers=False)
    assert warm.seconds == pytest.approx(2.72)  # running workers: the schedule alone


def test_measure_times_the_real_plan():
    """A timing of a real network: positive rates, the pairs it timed, the threads restored."""
    import torch

    x = np.random.default_rng(0).uniform(size=(3, 8, 8, 3))
    net = cnngp.io.architectures.get("cnngp2")
    plan = GramPlan(net, x.shape[1:], dtype="float32")
    before = torch.get_num_threads()
    r = timing.measure(plan, plan.images(x), threads=1)
    assert torch.get_num_threads() == before
    assert r.threads == 1 and r.seconds_per_pair > 0 and r.seconds_per_image > 0
    assert r.pairs_timed in {k * k for k in range(2, timing.MAX_SIDE + 1)}
    assert r.start_seconds >= 0 and "ms per pair" in r.describe()


def test_a_commands_plans_count_its_start_once():
    """``total_seconds``: each plan's own work, and the fixed part (the command's start, a cold
    cluster's) once: the first plan's, since a later one's "start" also holds the planning
    before it (its process is older when it is timed)."""
    from cnngp.engine.timing import total_seconds

    plans = [{"estimated_seconds": 10.0, "fixed_seconds": 3.0}, {"estimated_seconds": 5.0, "fixed_seconds": 3.5},
             {"estimated_seconds": 20.0, "fixed_seconds": 8.0}]
    assert total_seconds(plans) == pytest.approx(7 + 1.5 + 12 + 3)
    assert total_seconds([]) == 0.0 and total_seconds(plans[:1]) == 10.0
    assert total_seconds([{"estimated_seconds": 4.0}]) == 4.0  # a plan without a fixed part


def test_an_estimate_says_its_fixed_part():
    """The in-process estimate's fixed part is the command's start and warm-up; a cold local
    cluster's adds the cluster's start and stop and a worker's own start."""
    from cnngp.engine import timing

    rates = timing.Rates(seconds_per_pair=1e-3, seconds_per_image=1e-4, warmup_seconds=0.5, start_seconds=2.0,
                         threads=1, pairs_timed=4, load_average=None)
    stage = [timing.Stage("kernel", 10)]
    here = timing.estimate(rates, stage)
    assert here.fixed_seconds == pytest.approx(2.5)
    assert here.seconds == pytest.approx(2.5 + 55 * 1e-3 + 10 * 1e-4)
    cold = timing.estimate(rates, stage, workers=2)
    worker = max(2.0, timing.TYPICAL_START_SECONDS) + 0.5
    assert cold.fixed_seconds == pytest.approx(2.5 + timing.CLUSTER_START_SECONDS + worker + timing.CLUSTER_STOP_SECONDS)
    assert timing.estimate(rates, stage, workers=2, cold_workers=False).fixed_seconds == pytest.approx(2.5)
