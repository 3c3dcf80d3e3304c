"""Gradual unfreezing (`--unfreeze-at stages.3=2,all=4`): parts frozen by --freeze start to train at given epochs.

When a part starts to train, its parameters require gradients, its BatchNorms follow --freeze-bn's rule again
(they update their statistics), the optimizer gains parameter groups for it as timm builds them (weight decay and
--layer-decay scales, times --unfreeze-lr-scale) with fresh state, and under several processes the model is wrapped
again for DDP, whose gradient synchronisation covers only the parameters that required gradients when it was built.
A resumed run replays the schedule epoch by epoch, so its optimizer's groups are in the order of the original run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

from hubtune import model as model_lib
from hubtune.errors import ConfigError, get_logger

logger = get_logger("hubtune")

Schedule = list[tuple[int, str, list[str]]]  # (first epoch it trains, token, parameter names)


@dataclass(frozen=True)
class ThawSettings:
    """How a part that starts to train joins the optimizer (--weight-decay, --layer-decay, --unfreeze-lr-scale) and
    whether its BatchNorms were fixed by --freeze-bn (they update their statistics again)."""

    weight_decay: float
    layer_decay: float | None
    lr_scale: float
    freeze_bn: bool


def resolve_schedule(net: torch.nn.Module, unfreeze_at: list[tuple[str, int]], freeze: str,
                     frozen: list[str]) -> Schedule:
    """The --unfreeze-at schedule ([(group or glob, first epoch it trains)]) as parameter names, checked against
    what --freeze (`freeze`, as given) froze (`frozen`).

    Raises:
        ConfigError: a token matches no parameter that --freeze froze.
    """
    schedule, problems, was_frozen = [], [], set(frozen)
    for token, epoch in unfreeze_at:
        try:
            names = list(frozen) if token == "all" else model_lib.resolve_freeze(net, token)
        except ValueError as err:
            problems.append(f"--unfreeze-at {token}={epoch}: {str(err).removeprefix(f'--freeze {token!r} ')}")
            continue
        names = [n for n in names if n in was_frozen]
        if not names:
            problems.append(f"--unfreeze-at {token}={epoch}: {token!r} is not frozen by --freeze {freeze!r}")
        schedule.append((epoch, token, names))
    if problems:
        raise ConfigError("\n".join(problems))
    return schedule


def frozen_in(schedule: Schedule, frozen: list[str], epoch: int) -> list[str]:
    """The parameters still frozen in `epoch` (1-based)."""
    thawed = {n for start, _, names in schedule if start <= epoch for n in names}
    return [n for n in frozen if n not in thawed]


def describe(net: torch.nn.Module, schedule: Schedule, frozen: list[str], epochs: int) -> list[str]:
    """One line per epoch: what starts to train, and how many parameters train then (`hubtune summary`)."""
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    total = sum(sizes.values())
    lines = []
    for epoch in range(1, epochs + 1):
        still = frozen_in(schedule, frozen, epoch)
        starting = [token for start, token, _ in schedule if start == epoch]
        trainable = total - sum(sizes[n] for n in still)
        lines.append(f"epoch {epoch}: {trainable:,} of {total:,} parameters train"
                     + (f"; starts to train: {', '.join(starting)}" if starting else ""))
    return lines


def _new_groups(net: torch.nn.Module, thaw: ThawSettings, names: set[str]) -> list[dict[str, Any]]:
    """Optimizer parameter groups for `names`, as timm's create_optimizer_v2 would build them for the whole model."""
    no_decay: set[str] = getattr(net, "no_weight_decay", lambda: set())()
    if thaw.layer_decay is not None:
        groups = param_groups_layer_decay(net, thaw.weight_decay, no_weight_decay_list=no_decay,
                                          layer_decay=thaw.layer_decay)
    else:
        groups = param_groups_weight_decay(net, thaw.weight_decay, no_weight_decay_list=no_decay)
    wanted = {id(p) for n, p in net.named_parameters() if n in names}
    out = []
    for group in groups:
        params = [p for p in group["params"] if id(p) in wanted]
        if params:
            out.append({**group, "params": params,
                        "lr_scale": group.get("lr_scale", 1.0) * thaw.lr_scale})
    return out


@dataclass(frozen=True)
class Thawed:
    """What changed when parts started to train: the parameters still frozen, and the module that now steps (under
    several processes, the model prepared again for DDP). The optimizer also has their groups now, so a scheduler
    built before covers too few: its owner builds it again."""

    frozen: list[str]
    stepped: torch.nn.Module


def apply(net: torch.nn.Module, optimizer: Any, accelerator: Accelerator, stepped: torch.nn.Module,
          schedule: Schedule, frozen: list[str], thaw: ThawSettings, epoch: int) -> Thawed | None:
    """Make the parts scheduled to train by `epoch` (1-based) trainable: their parameters, BatchNorms and optimizer
    groups. None when no part starts to train in `epoch`.

    Args:
        net: the bare model.
        optimizer: Accelerate's prepared optimizer (the groups go into the optimizer it wraps).
        accelerator: the run's, which prepares the model again under several processes.
        stepped: what trains now (`net` as prepared).
        schedule: --unfreeze-at, resolved (`resolve_schedule`).
        frozen: the parameters frozen before `epoch`.
        thaw: how the new groups are built.
        epoch: the epoch about to start.
    """
    still = frozen_in(schedule, frozen, epoch)
    staying = set(still)
    starting = [n for n in frozen if n not in staying]
    if not starting:
        return None
    params = dict(net.named_parameters())
    for name in starting:
        params[name].requires_grad_(True)
    if thaw.freeze_bn:
        for module in net.modules():
            if model_lib.has_fixed_statistics(module) and all(p.requires_grad for p in module.parameters()):
                model_lib.unfix_statistics(module, training=net.training)
    for group in _new_groups(net, thaw, set(starting)):
        optimizer.optimizer.add_param_group(group)
    if accelerator.num_processes > 1:  # DDP synchronises only what required gradients when it was built
        old = stepped
        accelerator._models = [m for m in accelerator._models if m is not old]  # its reducer's hooks go with it
        stepped = accelerator.prepare_model(model_lib.unprepared(net))
        del old
    tokens = [token for start, token, _ in schedule if start == epoch]
    logger.info(f"epoch {epoch}: {', '.join(tokens)} start(s) to train ({len(starting)} parameter tensors)")
    return Thawed(frozen=still, stepped=stepped)
