"""The learning-rate schedule over optimizer steps, and how many steps an epoch has."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from timm.scheduler import CosineLRScheduler

from hubtune.data import DataInfo

if TYPE_CHECKING:
    from hubtune.run_state import RunState


@dataclass(frozen=True)
class StepPlan:
    """How long the run is and how the learning rate follows: --epochs, --max-steps (None: the epochs decide),
    --warmup-steps, and the examples per optimizer step of one process (--batch-size x --grad-accum)."""

    epochs: int
    max_steps: int | None
    warmup_steps: int
    batch_size: int
    grad_accum: int


def steps_per_epoch_hint(plan: StepPlan, info: DataInfo, world_size: int) -> int | None:
    """Optimizer steps in an epoch, from the training split's size in the metadata (None when it does not say)."""
    if info.train_size_hint is None:
        return None
    held_out = info.val_source.fraction if info.val_source.hashed else None
    n = info.train_size_hint * (1 - held_out if held_out is not None else 1)
    return max(1, math.ceil(n / (plan.batch_size * world_size * plan.grad_accum)))


def make_scheduler(optimizer: Any, plan: StepPlan, state: RunState) -> CosineLRScheduler:
    """Warmup + cosine over optimizer steps, positioned at state.global_step."""
    total = plan.max_steps or (state.steps_per_epoch * plan.epochs if state.steps_per_epoch else None)
    # an unknown length (no split size in the metadata) holds the peak lr until the first epoch has counted it
    scheduler = CosineLRScheduler(optimizer, t_initial=total or 10**9, warmup_t=plan.warmup_steps,
                                  warmup_lr_init=0.0, t_in_epochs=False, lr_min=0.0)
    if state.global_step:
        scheduler.step_update(num_updates=state.global_step)
    return scheduler
