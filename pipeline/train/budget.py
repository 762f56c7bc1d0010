"""How many training steps fit a time budget: the pure planner and the loop's re-planning clock.

Machines of one nominal size differ widely in step time (figures in BENCHMARKS.md, "Quickstart"),
so a run promised in ten minutes cannot be a fixed number of epochs. Instead the training
measures its own step time during its first steps, plans the number of steps that end before the
budget does, and sets the learning-rate schedule over those steps: a slower machine runs a shorter
but complete schedule (warm-up, decay to zero) instead of a long one cut short. The plan is
re-estimated every `REPLAN_EVERY` steps from the average step time so far, so a machine that slows
down (or speeds up) mid-run still ends on time; each re-plan moves the end of the schedule, never
the steps already taken.

`plan_steps` is a pure function (step time, budget, fixed costs -> steps); `StepClock` says
when to re-plan and how fast the steps were; `Schedule` is the schedule's length the training
loop follows, re-planned under DDP; `TimeBudget` is what a job hands the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from pipeline.cluster.job_log import say

# Steps timed before the first plan. The first steps of a run are slower (first-touch allocations,
# Ray Data's first blocks): they count against the budget through the clock, but the step time
# is measured from the end of step `UNTIMED_STEPS` on.
UNTIMED_STEPS = 2
CALIBRATION_STEPS = 10
REPLAN_EVERY = 25


@dataclass(frozen=True)
class TimeBudget:
    """A wall-clock budget: `seconds` from `started` (Unix time), of which `reserve_s` must be left
    when the last step ends (the final checkpoint and export, and whatever the caller runs after
    the training: the quickstart's segmentation, evaluation and overlays)."""

    started: float
    seconds: float
    reserve_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """A plan of `steps` optimizer steps in total (the schedule's length), and why.

    `needed_s` is the budget that `min_steps` steps would need at this speed; `short_by_s` is how
    much more than `budget_s` that is (0 when the minimum fits).
    """

    steps: int
    seconds_per_step: float
    budget_s: float
    fixed_s: float
    min_steps: int
    needed_s: float

    @property
    def short_by_s(self) -> float:
        return max(0.0, self.needed_s - self.budget_s)

    def warning(self) -> str | None:
        """One line when the budget is too short for the shortest useful schedule, else None."""
        if self.short_by_s <= 0:
            return None
        return (
            f"the budget of {self.budget_s / 60:.1f} min is too short for the shortest useful schedule "
            f"({self.min_steps} steps at {self.seconds_per_step:.2f} s/step need about "
            f"{math.ceil(self.needed_s / 60)} min); training {self.steps} steps so as to end in time"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "short_by_s": round(self.short_by_s, 1)}


def plan_steps(
    seconds_per_step: float,
    budget_s: float,
    fixed_s: float,
    *,
    steps_done: int = 0,
    max_steps: int | None = None,
    min_steps: int = 1,
) -> Plan:
    """The number of steps in total that fit `budget_s` seconds at `seconds_per_step`.

    `fixed_s` is the part of the budget that is not steps still to take: the time already spent
    (start-up, data, the `steps_done` steps taken) plus what must be left after the last step. The
    plan never goes below `steps_done` (steps taken stay taken) nor above `max_steps`. When even
    `min_steps` do not fit, the plan is still what fits, so the run ends in time, and
    `Plan.warning()` says how long the minimum would need.
    """
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be positive, got {seconds_per_step}")
    fit = steps_done + max(0, math.floor((budget_s - fixed_s) / seconds_per_step))
    steps = max(steps_done, fit if max_steps is None else min(max_steps, fit))
    minimum = min_steps if max_steps is None else min(min_steps, max_steps)
    needed = fixed_s + max(0, minimum - steps_done) * seconds_per_step
    return Plan(
        steps=steps,
        seconds_per_step=seconds_per_step,
        budget_s=budget_s,
        fixed_s=fixed_s,
        min_steps=minimum,
        needed_s=needed,
    )


class StepClock:
    """When to (re-)plan, and the measured step time, for one invocation of the training loop.

    The re-planning points depend on the step count only, so every DDP worker reaches them at the
    same step (each then agrees on the plan with a collective). Steps taken before a resume are
    not timed: only this invocation's steps say how fast this machine is now.
    """

    def __init__(self, budget: TimeBudget, first_step: int, clock=time.time) -> None:
        self.budget = budget
        self.first_step = first_step
        self._clock = clock
        self._timed_from: tuple[int, float] | None = None

    def step_done(self, step: int) -> bool:
        """Record that `step` steps are done in total; True when a re-plan is due now."""
        taken = step - self.first_step
        if taken == UNTIMED_STEPS:
            self._timed_from = (step, self._clock())
        if taken < CALIBRATION_STEPS:
            return False
        return (taken - CALIBRATION_STEPS) % REPLAN_EVERY == 0

    def plan(self, step: int, max_steps: int, min_steps: int) -> Plan:
        """The plan from the step time measured so far, `step` steps being done."""
        now = self._clock()
        first, started = self._timed_from
        seconds_per_step = max((now - started) / (step - first), 1e-6)
        fixed = (now - self.budget.started) + self.budget.reserve_s
        return plan_steps(
            seconds_per_step,
            self.budget.seconds,
            fixed,
            steps_done=step,
            max_steps=max_steps,
            min_steps=min_steps,
        )


class Schedule:
    """The length of a run's learning-rate schedule, planned against a time budget if there is one.

    Without a budget it is `max_steps`. With one, it starts as the plan of the checkpoint resumed
    from (`resumed`, a `record` saved with it) or `max_steps`, and `after_step` re-plans it at the
    clock's points from the step time this invocation measures; every DDP worker takes the
    smallest plan of all, so all stop at the same step. `announce`: print the first plan of this
    invocation (rank 0).
    """

    def __init__(
        self,
        max_steps: int,
        *,
        budget: TimeBudget | None = None,
        resumed: dict | None = None,
        min_steps: int = 1,
        images_per_step: int = 1,
        announce: bool = False,
    ) -> None:
        self.max_steps = max_steps
        self.steps = max_steps
        self.plan: dict | None = None
        self._budget = budget
        self._clock: StepClock | None = None
        self._now = time.time
        self._min_steps = min_steps
        self._images_per_step = images_per_step
        self._announce = announce
        if budget is not None and resumed and resumed.get("plan"):
            self.plan = resumed["plan"]
            self.steps = min(max_steps, int(resumed["planned_steps"]))

    def start(self, first_step: int, clock=time.time) -> None:
        """Start timing this invocation's steps, `first_step` steps being done already; `clock`
        (Unix seconds) also dates the expected end of the schedule."""
        self._now = clock
        if self._budget is not None:
            self._clock = StepClock(self._budget, first_step, clock)

    def after_step(self, step: int, device: torch.device) -> None:
        """`step` optimizer steps are done in all: re-plan if the clock says so (on every worker)."""
        if self._clock is None or not self._clock.step_done(step):
            return
        plan = self._clock.plan(step, self.max_steps, self._min_steps)
        steps = plan.steps
        if dist.is_available() and dist.is_initialized():
            reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
            agreed = torch.tensor([steps], dtype=torch.int64, device=reduce_device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            steps = int(agreed.item())
        plan = replace(plan, steps=steps)
        self.steps, self.plan = steps, plan.to_dict()
        if self._announce:
            self._announce = False
            images = self._images_per_step / plan.seconds_per_step
            end = time.strftime("%H:%M:%S", time.localtime(self._expected_end(step)))
            say(
                f"train: plan: {steps} steps in all ({step} done) at {plan.seconds_per_step:.3f} s/step, "
                f"{images:.1f} images/s; the schedule ends at step {steps}, about {end} "
                f"(budget {plan.budget_s / 60:.1f} min)"
            )
            if plan.warning():
                say(f"train: {plan.warning()}")

    def record(self, step: int) -> dict:
        """What an epoch's metrics (and a checkpoint) say of the schedule: the step reached, the
        plan and its end."""
        record = {"step": step, "planned_steps": self.steps}
        if self.plan is not None:
            record["plan"] = self.plan
            record["expected_end"] = self._expected_end(step)
        return record

    def _expected_end(self, step: int) -> float:
        """Unix time the planned schedule ends at the plan's step time, `step` steps being done."""
        return self._now() + (self.steps - step) * self.plan["seconds_per_step"]
