"""The time-budget planner: steps that fit, the shortest useful schedule, re-planning, completion.

Pure functions and a clock handed in as a function: no Ray, no waiting.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.budget import (
    CALIBRATION_STEPS,
    REPLAN_EVERY,
    UNTIMED_STEPS,
    Schedule,
    StepClock,
    TimeBudget,
    plan_steps,
)
from pipeline.train.config import TrainConfig
from pipeline.train.job import is_finished
from pipeline.train.metrics import LOSS_NAMES, format_epoch
from pipeline.train.optimizer import lr_factor


def test_plan_takes_the_steps_that_fit_what_is_left_of_the_budget():
    plan = plan_steps(0.5, budget_s=600, fixed_s=100)
    assert plan.steps == 1000
    assert plan.fixed_s + plan.steps * plan.seconds_per_step <= 600
    assert plan.warning() is None and plan.short_by_s == 0

    # Steps already taken count in the fixed part and stay taken.
    assert plan_steps(0.5, budget_s=600, fixed_s=300, steps_done=400).steps == 400 + 600


def test_plan_never_exceeds_the_most_steps_nor_undoes_steps_taken():
    assert plan_steps(0.1, budget_s=600, fixed_s=10, max_steps=750).steps == 750
    # The budget is already spent: stop where the run is.
    late = plan_steps(0.5, budget_s=600, fixed_s=700, steps_done=10, max_steps=750)
    assert late.steps == 10


def test_a_machine_too_slow_for_the_minimum_gets_one_line_and_still_ends_in_time():
    # 3 s/step: 200 steps would need 150 + 600 s; 10 minutes hold 150 steps.
    plan = plan_steps(3.0, budget_s=600, fixed_s=150, min_steps=200, max_steps=4500)
    assert plan.steps == 150
    assert plan.fixed_s + plan.steps * plan.seconds_per_step <= 600  # what is trained ends in time
    assert plan.short_by_s == pytest.approx(150)
    line = plan.warning()
    assert line is not None and "\n" not in line
    assert "13 min" in line and "200 steps" in line and "training 150 steps" in line


def test_the_minimum_is_at_most_the_steps_the_run_may_take():
    plan = plan_steps(1.0, budget_s=60, fixed_s=10, min_steps=200, max_steps=24)
    assert plan.steps == 24 and plan.min_steps == 24 and plan.warning() is None


def test_step_time_is_not_positive():
    with pytest.raises(ValueError):
        plan_steps(0.0, budget_s=60, fixed_s=0)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_clock_plans_after_calibration_then_every_few_steps_from_the_measured_step_time():
    clock = FakeClock(1000.0)
    budget = TimeBudget(started=1000.0 - 30, seconds=600, reserve_s=50)  # 30 s of start-up spent
    steps = StepClock(budget, first_step=0, clock=clock)
    due = []
    for step in range(1, 100):
        # The first steps are slow (first-touch allocations); the clock must not time them.
        clock.now += 5.0 if step <= UNTIMED_STEPS else 0.5
        if steps.step_done(step):
            due.append(step)
    assert due == [CALIBRATION_STEPS, CALIBRATION_STEPS + REPLAN_EVERY, CALIBRATION_STEPS + 2 * REPLAN_EVERY,
                   CALIBRATION_STEPS + 3 * REPLAN_EVERY]  # fmt: skip
    plan = steps.plan(99, max_steps=10_000, min_steps=200)
    assert plan.seconds_per_step == pytest.approx(0.5)
    # Spent: 30 s start-up, 10 s of slow steps, 48.5 s of fast ones; 50 s kept at the end.
    left = 600 - (30 + 10 + 97 * 0.5) - 50
    assert plan.steps == 99 + int(left // 0.5)


def test_a_resumed_run_times_only_its_own_steps():
    clock = FakeClock(0.0)
    steps = StepClock(TimeBudget(started=0.0, seconds=600), first_step=300, clock=clock)
    assert not steps.step_done(300 + CALIBRATION_STEPS - 1)
    for step in range(301, 300 + CALIBRATION_STEPS):
        clock.now += 1.0
        steps.step_done(step)
    clock.now += 1.0
    assert steps.step_done(300 + CALIBRATION_STEPS)
    assert steps.plan(300 + CALIBRATION_STEPS, max_steps=10_000, min_steps=1).seconds_per_step == 1.0


def test_a_resumed_schedule_keeps_its_plan_until_it_re_plans_and_records_it(capsys):
    plan = {"steps": 700, "seconds_per_step": 0.6}
    resumed = {"step": 450, "planned_steps": 700, "plan": plan}
    # Without a budget the plan of the checkpoint is not followed: the epochs asked for are.
    assert Schedule(4500, resumed=resumed).steps == 4500
    clock = FakeClock(0.0)
    schedule = Schedule(4500, budget=TimeBudget(started=0.0, seconds=600), resumed=resumed, announce=True)
    schedule.start(first_step=450, clock=clock)
    assert schedule.steps == 700
    for step in range(451, 450 + CALIBRATION_STEPS + 1):
        clock.now += 0.5
        schedule.after_step(step, torch.device("cpu"))
    # 5 s spent, 10 steps at 0.5 s/step: 1190 more steps fit in the 595 s left.
    assert schedule.steps == 460 + 1190
    record = schedule.record(460)
    assert record["planned_steps"] == record["plan"]["steps"] == 1650
    # The 1190 steps left at the 0.5 s/step of the plan, from the schedule's clock at the record.
    assert record["expected_end"] == clock.now + 595
    printed = capsys.readouterr().out
    assert printed.count("train: plan: 1650 steps") == 1 and "images/s" in printed


def _config(**changes) -> TrainConfig:
    fields = dict(
        train_annotations="a", train_images="i", output="o", preset="tiny", epochs=5, batch_size=4,
        optimizer="adamw", warmup_iters=50, lr_schedule="cosine",
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def test_the_schedule_ends_at_the_last_planned_step_with_a_warm_up_of_at_most_a_quarter():
    config = _config()
    assert config.total_steps(150) == 750
    assert _config(max_steps=400).total_steps(150) == 400
    planned = 120  # a slow machine: fewer steps than the 750 of the epochs
    factors = [lr_factor(step, planned, "cosine", config.warmup_iters) for step in range(planned + 1)]
    assert factors[planned] == pytest.approx(0.0, abs=1e-12)
    # Warm-up: 120 // 4 = 30 steps, then the cosine decay as if it had started at step 0.
    assert max(factors) == pytest.approx(factors[30]) == 0.5 * (1 + math.cos(math.pi * 30 / planned))
    assert all(a <= b for a, b in zip(factors[:30], factors[1:31], strict=True))
    assert all(a >= b for a, b in zip(factors[30:-1], factors[31:], strict=True))


def test_a_run_is_finished_when_its_schedule_is():
    budgeted = TrainConfig(train_annotations="a", train_images="i", output="o", epochs=30, max_minutes=9.0)
    assert budgeted.steps_per_epoch(1200) == 150
    last = {"epoch": 5, "step": 712, "planned_steps": 712, "plan": {"steps": 712}}
    assert is_finished(budgeted, last, 1200)
    assert not is_finished(budgeted, {**last, "step": 600}, 1200)
    # The same output without a budget: the epochs asked for decide, so more epochs train on.
    epochs = TrainConfig(train_annotations="a", train_images="i", output="o", epochs=5)
    assert not is_finished(epochs, last, 1200)
    assert is_finished(epochs, {"epoch": 5}, 1200)
    stepped = TrainConfig(train_annotations="a", train_images="i", output="o", epochs=5, max_steps=700)
    assert is_finished(stepped, {"epoch": 5, "step": 700, "planned_steps": 700}, 1200)


def test_the_epoch_line_tells_the_step_of_the_plan_and_when_it_ends():
    epoch = {"epoch": 2, "loss": 1.0, **{name: 0.2 for name in LOSS_NAMES}, "lr": 0.001,
             "images_per_second": 13.0, "step": 300, "planned_steps": 712, "expected_end": 0.0}  # fmt: skip
    line = format_epoch(epoch, 30)
    assert "\n" not in line and "step 300/712" in line and "ends about" in line
