"""Checkpoint directories: atomic writes, integrity manifest, retention, discovery and safe loading.

A checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNN/`: tensors in safetensors, everything else in JSON, a manifest
(size + sha256 of every file) written last. Accelerate's save_state is not used because it pickles RNG states and
custom objects (loaded with weights_only=False); here nothing needs unpickling.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hubtune.errors import CheckpointError
from hubtune.files import (
    CHECKPOINTS_DIR,
    STEP_GLOB,
    TMP_PREFIX,
    checkpoint_step,
    disk_space,
    fsync_path,
    newest_first,
    sha256_file,
    step_name,
    step_of,
)
from hubtune.files import WEIGHTS_FILE as MODEL_FILE
from hubtune.records import EpochRow

logger = logging.getLogger("hubtune")

OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_TENSORS = "rng.safetensors"
STATE_FILE = "state.json"
EMA_TENSORS = "ema.safetensors"  # --model-ema: the EMA of every tensor but the frozen parameters
MANIFEST = "manifest.json"
REQUIRED = (MODEL_FILE, OPTIMIZER_TENSORS, RNG_TENSORS, STATE_FILE)


def step_dir(root: Path, step: int) -> Path:
    return root / CHECKPOINTS_DIR / step_name(step)


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "value"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_tensors."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    return split_tensors(optimizer.state_dict(), "", tensors), tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    state = join_tensors(meta, tensors)
    # JSON turned the integer parameter ids of `state` into strings
    state["state"] = {int(k): v for k, v in state["state"].items()}
    optimizer.load_state_dict(state)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's python, numpy, torch and CUDA RNG states."""
    version, internal, gauss = random.getstate()
    # numpy's stub types the call without arguments as the dict form; the global RandomState (MT19937) returns its
    # legacy tuple, as the default legacy=True asks
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write(
    root: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_meta: dict,
    optimizer_tensors: dict[str, torch.Tensor], ranks: list[tuple[dict, dict[str, torch.Tensor]]], state: dict,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint atomically: a temporary directory, fsync, then one rename.

    `ranks` holds each process's (json-able state, tensors): RNG and data position. A crash at any point
    leaves either the previous checkpoints only or the new one complete, never a partial `step-*`.
    """
    final = step_dir(root, step)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    rank_tensors = {f"rank{r}.{k}": v for r, (_, tensors) in enumerate(ranks) for k, v in tensors.items()}
    full_state = json.dumps({**state, "optimizer": optimizer_meta, "ranks": [meta for meta, _ in ranks]}, indent=1)
    needed = len(full_state) + sum(t.numel() * t.element_size() for group in (
        model_state, optimizer_tensors, rank_tensors, ema_state or {}) for t in group.values())
    with disk_space(final.parent, needed, f"saving checkpoint {final.name}", cleanup=tmp):
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_TENSORS))
        save_file(rank_tensors, str(tmp / RNG_TENSORS))
        if ema_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_TENSORS))
        (tmp / STATE_FILE).write_text(full_state)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        for name in files:
            fsync_path(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run interrupted at once): replace it
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(final.parent)
    return final


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file a checkpoint needs is listed in its manifest, present, and of the
    listed size and sha256."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)")
    try:
        listed = json.loads(manifest.read_text())["files"]
        sizes = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({type(err).__name__}: {err})") from None
    missing = [name for name in REQUIRED if name not in sizes]
    if missing:
        raise CheckpointError(f"{path}: {MANIFEST} does not list {', '.join(missing)}")
    for name, (size, digest) in sizes.items():
        f = path / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != size or sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is damaged (size or checksum differs from the manifest)")
    # a manifest is only a checksum: files that match it may still be something else (pickle bytes named
    # .safetensors, a header that lies about its tensors, a state.json that is not JSON); their headers are read here,
    # no tensor is loaded
    for name in sizes:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path / name), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{path}: {name} is not a safetensors file ({err})") from None
    read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, which must be a JSON object (its fields: resume_checks.check_state).

    Raises:
        CheckpointError: it cannot be read or is not a JSON object.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path}: {STATE_FILE} is not JSON ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {STATE_FILE} holds a JSON {type(state).__name__}, expected an object")
    return state


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor],
                              dict[str, torch.Tensor]]:
    """(state, model tensors, optimizer tensors, per-rank tensors) of a verified checkpoint."""
    verify(path)
    state = read_state(path)
    model, optimizer, ranks = (load_tensors(path / name) for name in (MODEL_FILE, OPTIMIZER_TENSORS, RNG_TENSORS))
    return state, model, optimizer, ranks


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of a checkpoint.

    Raises:
        CheckpointError: the file cannot be loaded.
    """
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # RuntimeError: a dtype torch lacks
        raise CheckpointError(f"{f.parent}: {f.name} cannot be loaded ({err})") from None


def tensor_names(f: Path) -> set[str]:
    """The names of the tensors a (verified) safetensors file holds, read from its header alone."""
    with safe_open(str(f), framework="pt") as opened:
        return set(opened.keys())


def saved_config(path: Path) -> dict[str, Any]:
    """The resolved TrainConfig fields a (verified) checkpoint was saved with."""
    config = read_state(path).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {STATE_FILE} has no config object")
    return config


def load_weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (its EMA weights with `ema`), after checking every file against its
    manifest."""
    verify(path)
    weights = load_tensors(path / MODEL_FILE)
    return {**weights, **load_ema(path)} if ema else weights


def load_ema(path: Path) -> dict[str, torch.Tensor]:
    """The EMA tensors a checkpoint of a --model-ema run holds (the frozen parameters are the model's own).

    Raises:
        CheckpointError: the checkpoint has no EMA weights (saved by a run without --model-ema).
    """
    if not (path / EMA_TENSORS).is_file():
        raise CheckpointError(f"{path}: no {EMA_TENSORS}; it was saved without --model-ema")
    return load_tensors(path / EMA_TENSORS)


def best_intact(root: Path, history: Sequence[EpochRow], metric: str, higher_is_better: bool,
                skip: set[str]) -> tuple[Path, EpochRow] | None:
    """The intact end-of-epoch checkpoint with the best `metric` (of the raw weights), and its history row; None if
    there is none.

    `skip`: checkpoint names already known to be damaged.
    """
    by_step = {row.step: row for row in history}
    ranked = []
    for path in listing(root):
        step = step_of(path.name)
        row = by_step.get(step) if step is not None else None
        if row is not None and path.name not in skip:
            value = row.val.score(metric)
            ranked.append((value if higher_is_better else -value, row.epoch, path, row))
    for *_, path, row in sorted(ranked, key=lambda r: (r[0], -r[1]), reverse=True):
        try:
            verify(path)
            return path, row
        except CheckpointError as err:
            logger.warning(f"checkpoint {path.name} cannot be exported either: {err}")
    return None


def rank_tensors(all_tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in all_tensors.items() if k.startswith(prefix)}


def listing(root: Path) -> list[Path]:
    """Checkpoint directories under OUTPUT_DIR, oldest step first (complete or not; see verify)."""
    base = Path(root) / CHECKPOINTS_DIR
    if not base.is_dir():
        return []
    return [base / n for n in reversed(newest_first(p.name for p in base.iterdir() if p.is_dir()))]


def find_resume(root: Path, spec: str, check: Callable[[Path], None] = verify) -> Path | None:
    """The checkpoint to resume from for --resume latest|PATH; None for 'latest' when there is none.

    `check` raises CheckpointError for a checkpoint that cannot be resumed (resume_checks.check_saved: verified, and
    its state is one a run could have saved); 'latest' then falls back to the previous one, with a warning.

    Raises:
        CheckpointError: an explicit PATH does not exist or is damaged, or no checkpoint is usable.
    """
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            names = ", ".join(p.name for p in listing(root)) or "none"
            raise CheckpointError(f"--resume {spec!r} does not exist; checkpoints in {root}: {names}")
        check(path)
        return path
    found = newest_usable(root, check)
    if found is None and listing(root):
        raise CheckpointError(f"--resume latest: no usable checkpoint in {root / CHECKPOINTS_DIR} (all are damaged)")
    return found


def newest_usable(root: Path, check: Callable[[Path], None] = verify, below: Path | None = None) -> Path | None:
    """The newest checkpoint that passes `check` (older than `below` if given), warning about each one skipped."""
    candidates = listing(root)
    if below is not None:
        candidates = [p for p in candidates if checkpoint_step(p.name) < checkpoint_step(below.name)]
    for path in reversed(candidates):
        try:
            check(path)
            return path
        except CheckpointError as err:
            logger.warning(f"skipping damaged checkpoint: {err}; trying the previous one")
    return None


def prune(root: Path, keep_last: int, keep: set[str]) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and those named in `keep` (the best)."""
    complete = [p for p in listing(root) if (p / MANIFEST).is_file()]
    doomed = [p for p in complete[: max(len(complete) - keep_last, 0)] if p.name not in keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    for stale in (Path(root) / CHECKPOINTS_DIR).glob(f"{TMP_PREFIX}{STEP_GLOB}"):
        if not stale.name.endswith(f"-{os.getpid()}"):  # left by a run that crashed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    return doomed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_columns(state: dict[str, Any]) -> tuple[str, str, str]:
    """The step, position and metric columns of `hubtune checkpoints` for a checkpoint's state.json."""
    run_state, metric = state["run_state"], state["config"]["metric"]
    where = "in epoch" if run_state["in_epoch"] else "end of epoch"
    epoch = run_state["epoch"] + (1 if run_state["in_epoch"] else 0)
    last = EpochRow.from_json(run_state["history"][-1]) if run_state["history"] else None
    shown = f"{metric} {last.val.score(metric):.4f}" if last and not run_state["in_epoch"] else "-"
    return str(run_state["global_step"]), f"{where} {epoch}", shown
