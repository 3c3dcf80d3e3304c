"""What a checkpoint must hold to be resumed, checked before anything is loaded from it.

A manifest proves only that a checkpoint's files are the ones written with it: a folder written to match its own
manifest can still hold pickle bytes named .safetensors (checkpoint.verify reads every header), a negative epoch, a
step its examples could not reach (which would then train nothing), a best checkpoint named `../..`, a missing
optimizer or per-process entry, or the tensors of another model. `check_saved` needs only the files, so that
`--resume latest` passes over such a checkpoint as over a damaged one; `check_fits` and `check_optimizer` compare it
with the model and the optimizer built for the run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hubtune import checkpoint
from hubtune.config import METRICS, UPPER_BOUNDS
from hubtune.errors import CheckpointError
from hubtune.records import EpochRow, best_from_json, stop_from_json


def check_saved(path: Path) -> None:
    """Verify a checkpoint against its manifest, then `check_state` (reads the headers and the RNG tensors only).

    Raises:
        CheckpointError: naming the checkpoint, the file or field, and its value.
    """
    checkpoint.verify(path)
    check_state(path, checkpoint.read_state(path), checkpoint.tensor_names(path / checkpoint.OPTIMIZER_TENSORS),
                checkpoint.load_tensors(path / checkpoint.RNG_TENSORS))


def check_state(path: Path, saved: dict[str, Any], optimizer_tensors: Iterable[str],
                rank_tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a state.json that no run could have saved: a field of the wrong type or out of range, values that
    contradict each other (the step, the folder's name and the examples trained), an optimizer entry that refers to
    missing tensors, or a per-process entry missing or with RNG states that cannot be set (every process's is
    checked, so that all processes decide alike).

    Raises:
        CheckpointError: naming the checkpoint, the field and its value.
    """
    problem = (_state_problem(saved, checkpoint.step_of(path.name))
               or _optimizer_problem(saved["optimizer"], set(optimizer_tensors))
               or _ranks_problem(saved, rank_tensors))
    if problem:
        raise CheckpointError(f"{path}: {checkpoint.STATE_FILE}: {problem}")


def check_fits(path: Path, what: str, tensors: dict[str, torch.Tensor], model: dict[str, torch.Tensor],
               exact: bool) -> None:
    """Refuse tensors that are not the model's, by name and shape (`exact`: every tensor of the model too).

    Raises:
        CheckpointError: naming the first tensors that differ.
    """
    missing = sorted(set(model) - set(tensors)) if exact else []
    extra = sorted(set(tensors) - set(model))
    wrong = [f"{k} {list(t.shape)} (the model's: {list(model[k].shape)})" for k, t in tensors.items()
             if k in model and t.shape != model[k].shape]
    found = (("wrong shape", wrong), ("missing", missing), ("not in the model", extra))
    problems = [f"{label}: {', '.join(names[:3])}{' ...' * (len(names) > 3)}" for label, names in found if names]
    if problems:
        raise CheckpointError(f"{path}: its {what} do not fit this model ({'; '.join(problems)})")


def check_optimizer(path: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state (tensors joined in) whose parameter groups, numeric settings or per-parameter
    tensors are not those of `optimizer`: torch would load it and fail, or train wrongly, at the first step.

    Raises:
        CheckpointError: naming the group, setting or parameter.
    """
    sizes, ours = [len(g["params"]) for g in saved["param_groups"]], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != ours:
        raise CheckpointError(f"{path}: its optimizer has parameter groups of {sizes} parameters, this run's {ours}")
    for i, (group, current) in enumerate(zip(saved["param_groups"], optimizer.param_groups)):
        for key, value in current.items():  # numbers only: torch versions differ in flags (foreach, fused: None/bool)
            if key != "params" and _number(value) and key in group and not _number(group[key]):
                raise CheckpointError(f"{path}: its optimizer's parameter group {i} has {key} = "
                                      f"{_shown(group[key])}, expected a number")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            shape = params[int(index)].shape
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shape:
                raise CheckpointError(f"{path}: its optimizer's {key} of parameter {index} has shape "
                                      f"{list(value.shape)}, the parameter {list(shape)}")


def _int(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _real(value: Any) -> bool:
    """A JSON number (NaN and infinity included: a metric may be one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _state_problem(saved: dict[str, Any], folder_step: int | None) -> str | None:
    """The first field that no run could have written, or that contradicts another; None if there is none."""
    for key, kind in (("run_state", dict), ("config", dict), ("run", dict), ("optimizer", dict), ("ranks", list)):
        if not isinstance(saved.get(key), kind):
            return f"{key} is {_shown(saved.get(key))}, expected a JSON {'list' if kind is list else 'object'}"
    rs, cfg = saved["run_state"], saved["config"]
    for name in ("epoch", "global_step", "bad_evals", "examples_seen", "segments"):
        if not _int(rs.get(name, 0)):
            return f"run_state.{name} is {_shown(rs.get(name))}, expected an integer >= 0"
    history, best, stopped = rs.get("history", []), rs.get("best", {}), rs.get("stopped")
    for name, ok, expected in (
            ("in_epoch", isinstance(rs.get("in_epoch", False), bool), "true or false"),
            ("steps_per_epoch", rs.get("steps_per_epoch") is None or _int(rs["steps_per_epoch"], 1), "null or >= 1"),
            ("elapsed_s", _number(rs.get("elapsed_s", 0.0)) and rs.get("elapsed_s", 0.0) >= 0, "a number >= 0"),
            ("history", isinstance(history, list) and all(isinstance(r, dict) for r in history), "a list of epochs"),
            ("best", isinstance(best, dict), "an object"),
            ("stopped", stopped is None or isinstance(stopped, dict) and isinstance(stopped.get("reason"), str),
             "null or an object with a reason")):
        if not ok:
            return f"run_state.{name} is {_shown(rs.get(name))}, expected {expected}"
    epochs, max_steps, metric = cfg.get("epochs"), cfg.get("max_steps"), cfg.get("metric")
    if not (_int(epochs, 1) and epochs <= UPPER_BOUNDS["epochs"]):
        return f"config.epochs is {_shown(epochs)}, expected an integer from 1 to {UPPER_BOUNDS['epochs']:,}"
    if max_steps is not None and not (_int(max_steps, 1) and max_steps <= UPPER_BOUNDS["max_steps"]):
        return f"config.max_steps is {_shown(max_steps)}, expected null or 1 to {UPPER_BOUNDS['max_steps']:,}"
    if metric not in METRICS:
        return f"config.metric is {_shown(metric)}, expected one of {', '.join(METRICS)}"
    for name in ("model_revision", "dataset_revision"):
        if not isinstance(cfg.get(name), (str, type(None))):
            return f"config.{name} is {_shown(cfg.get(name))}, expected a string or null"

    epoch, step = rs.get("epoch", 0), rs.get("global_step", 0)
    if folder_step is not None and step != folder_step:
        return f"run_state.global_step is {step:,}, but the checkpoint is step {folder_step:,}"
    reach = max_steps or UPPER_BOUNDS["max_steps"]
    if step > reach:
        return f"run_state.global_step is {step:,}, beyond the {reach:,} steps the run could reach"
    if epoch > epochs:
        return f"run_state.epoch is {epoch}, beyond the run's {epochs} epoch(s)"
    if len(history) != epoch:
        return f"run_state.history holds {len(history)} epoch(s), but run_state.epoch is {epoch}"
    done, examples = 0, 0
    for i, row in enumerate(history, start=1):
        if row.get("epoch") != i or not _int(row.get("step")) or not _int(row.get("train_examples")) or not all(
                _real(row.get(m)) for m in METRICS):
            return f"run_state.history[{i - 1}] is {_shown(row)}, expected the record of epoch {i}"
        if not done <= row["step"] <= done + row["train_examples"]:  # every optimizer step trains >= 1 example
            return (f"run_state.history: epoch {i} ends at step {row['step']:,}, which {row['train_examples']} "
                    f"examples after step {done:,} cannot reach")
        done, examples = row["step"], examples + row["train_examples"]
    if "examples_seen" in rs and rs["examples_seen"] != examples:
        return f"run_state.examples_seen is {rs['examples_seen']}, but the epochs in history trained {examples}"
    progress = [r.get("progress") for r in saved["ranks"] if isinstance(r, dict)]
    trained = sum(p.get("n", 0) for p in progress if isinstance(p, dict) and _int(p.get("n", 0)))
    if rs.get("in_epoch") and not done <= step <= done + trained:
        return (f"run_state.global_step is {step:,}, which the {trained} examples trained after step {done:,} (the "
                "last epoch's end) cannot reach")
    if not rs.get("in_epoch") and step != done:
        return f"run_state.global_step is {step:,}, but the last epoch in history ended at step {done:,}"
    name = best.get("checkpoint")
    if name is not None and not (checkpoint.step_of(name) is not None and checkpoint.step_of(name) <= step):
        return f"run_state.best.checkpoint is {_shown(name)}, expected a checkpoint of this run (step-NNNNNN)"
    if best and not _real(best.get(metric)):
        return f"run_state.best.{metric} is {_shown(best.get(metric))}, expected a number"
    try:  # what restore reads them as (per-class scores, the EMA's metrics, the stop record)
        for row in history:
            EpochRow.from_json(row)
        best_from_json(best)
        stop_from_json(stopped)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"run_state's history, best or stopped cannot be read ({type(err).__name__}: {_shown(str(err))})"
    return None


def _optimizer_problem(meta: dict[str, Any], stored: set[str]) -> str | None:
    """What is wrong with the optimizer entry: its groups, its per-parameter state, the tensors it refers to."""
    groups, state = meta.get("param_groups"), meta.get("state")
    if not (isinstance(state, dict) and isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_int(i) for i in g["params"])
            for g in groups)):
        return f"optimizer is {_shown(meta)}, expected its state and param_groups"
    ids = sorted(i for g in groups for i in g["params"])
    if ids != list(range(len(ids))):
        return f"optimizer.param_groups number the parameters {_shown(ids)}, expected 0 to {len(ids) - 1} once each"
    odd = [k for k, v in state.items() if not (k.isdigit() and int(k) < len(ids) and isinstance(v, dict))]
    if odd:
        return f"optimizer.state has an entry {odd[0]!r}, expected the index of a parameter in param_groups"
    refs: list[str] = []
    _tensor_refs(meta, refs)
    missing = sorted(set(refs) - stored)
    if missing:
        return f"optimizer refers to tensors {', '.join(missing[:3])} that {checkpoint.OPTIMIZER_TENSORS} lacks"
    return None


def _tensor_refs(obj: Any, refs: list[str]) -> None:
    """Collect the {"__tensor__": key} references of a nested dict/list (see checkpoint.split_tensors)."""
    if isinstance(obj, dict) and set(obj) == {"__tensor__"}:
        refs.append(str(obj["__tensor__"]))
    for value in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
        _tensor_refs(value, refs)


def _ranks_problem(saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the per-process entries: one per process, each a data position and RNG states that set."""
    ranks, count = saved["ranks"], saved["run"].get("num_processes", len(saved["ranks"]))
    if not ranks or len(ranks) != count:
        return f"ranks holds {len(ranks)} entries, expected one per process ({_shown(count)})"
    for r, meta in enumerate(ranks):
        progress = meta.get("progress") if isinstance(meta, dict) else None
        if not isinstance(progress, dict) or not all(_int(progress.get(k, 0)) for k in ("n", "bad", "seen")) or not (
                _number(progress.get("loss_sum", 0.0)) and isinstance(progress.get("loader"), (dict, type(None)))):
            return f"ranks[{r}] is {_shown(meta)}, expected the process's RNG states and data position"
        mine = checkpoint.rank_tensors(tensors, r)
        try:  # on generators of their own: the process's RNG streams are set only once all of this passed
            version, internal, gauss = meta["python"]
            random.Random().setstate((version, tuple(internal), gauss))
            kind, pos, has_gauss, cached = meta["numpy"]
            keys = mine["numpy_keys"].numpy().astype(np.uint32)
            np.random.RandomState().set_state((kind, keys, pos, has_gauss, cached))
            torch.Generator().set_state(mine["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            return f"ranks[{r}]: its RNG states cannot be set ({type(err).__name__}: {str(err).splitlines()[0]})"
    return None
