"""The learning-rate schedule over optimizer steps, and how many steps an epoch has."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from timm.scheduler import CosineLRScheduler

from hubtune.config import TrainConfig
from hubtune.data import DataInfo

if TYPE_CHECKING:
    from hubtune.run_state import RunState


def steps_per_epoch_hint(cfg: TrainConfig, info: DataInfo, world_size: int) -> int | None:
    if info.train_size_hint is None:
        return None
    n = info.train_size_hint * (1 - cfg.val_fraction if info.val_source.startswith("hash") else 1)
    return max(1, math.ceil(n / (cfg.batch_size * world_size * cfg.grad_accum)))


def make_scheduler(optimizer: Any, cfg: TrainConfig, state: RunState) -> CosineLRScheduler:
    """Warmup + cosine over optimizer steps, positioned at state.global_step."""
    total = cfg.max_steps or (state.steps_per_epoch * cfg.epochs if state.steps_per_epoch else None)
    # an unknown length (no split size in the metadata) holds the peak lr until the first epoch has counted it
    scheduler = CosineLRScheduler(optimizer, t_initial=total or 10**9, warmup_t=cfg.warmup_steps,
                                  warmup_lr_init=0.0, t_in_epochs=False, lr_min=0.0)
    if state.global_step:
        scheduler.step_update(num_updates=state.global_step)
    return scheduler
