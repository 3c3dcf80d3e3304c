"""Run bookkeeping that a checkpoint carries: progress, history, best model, early stopping, resume checks."""

from __future__ import annotations

import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from hubtune import checkpoint
from hubtune.config import TrainConfig

logger = get_logger("hubtune")

# Config fields whose change would make a resumed run a different run.
RESUME_MUST_MATCH = ("model", "dataset", "image_size", "val_fraction", "freeze", "freeze_bn", "batch_size",
                     "grad_accum", "seed", "shuffle_buffer", "num_workers")


@dataclass
class RunState:
    """Everything about progress that is not a tensor; saved as JSON in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    global_step: int = 0
    in_epoch: bool = False  # saved inside an epoch: the data position is restored, not restarted
    steps_per_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the metric last improved (early stopping)
    stopped: dict[str, Any] | None = None
    examples_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def update_best(state: RunState, row: dict[str, Any], cfg: TrainConfig) -> bool:
    """Record an evaluation; return True if it is the new best. Sets state.stopped on early stopping."""
    value = row[cfg.metric]
    if state.best:
        gain = value - state.best[cfg.metric] if cfg.higher_is_better else state.best[cfg.metric] - value
        improved = gain > cfg.early_stopping_min_delta
    else:
        improved = True
    if improved:
        state.best = dict(row)
        state.bad_evals = 0
    else:
        state.bad_evals += 1
    patience = cfg.early_stopping_patience
    if patience and state.bad_evals >= patience:
        state.stopped = {
            "reason": "early_stopping", "epoch": row["epoch"], "step": row["step"],
            "detail": f"{cfg.metric} did not improve by more than {cfg.early_stopping_min_delta} for {patience} "
                      f"evaluation(s); best {state.best[cfg.metric]:.6g} at epoch {state.best['epoch']}",
        }
    return improved


def resume_differences(saved: dict[str, Any], cfg: TrainConfig, run: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run and this one, one message per difference."""
    diffs = []
    old_cfg = saved["config"]
    for key in RESUME_MUST_MATCH:
        if old_cfg.get(key) != getattr(cfg, key):
            diffs.append(f"--{key.replace('_', '-')}: checkpoint has {old_cfg.get(key)!r}, this run has "
                         f"{getattr(cfg, key)!r}")
    for key, what in (("dataset_revision", "dataset revision"), ("class_names", "classes"),
                      ("val_source", "validation split"), ("num_processes", "number of processes")):
        if saved["run"].get(key) != run.get(key):
            diffs.append(f"{what}: checkpoint has {saved['run'].get(key)!r}, this run has {run.get(key)!r}")
    return diffs


class StopRequest:
    """SIGTERM/SIGINT set a flag; training saves a checkpoint at the next step boundary and exits.

    A second Ctrl-C interrupts at once (the latest complete checkpoint is still there).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


class TrainingInterrupted(Exception):
    """Raised after the checkpoint requested by a signal has been written."""

    def __init__(self, signum: int, checkpoint: Path, command: str) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved {checkpoint}; resume with: {command} --resume latest")


def save_checkpoint(accelerator: Accelerator, out: Path, net: Any, optimizer: Any, state: RunState,
                    epoch_progress: dict, cfg: TrainConfig, run: dict) -> Path:
    """Gather every process's RNG and data position, then the main process writes one atomic checkpoint."""
    rng_meta, rng_tensors = checkpoint.rng_state()
    mine = ({**rng_meta, "progress": epoch_progress}, rng_tensors)
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    path = checkpoint.step_dir(out, state.global_step)
    if accelerator.is_main_process:
        opt_meta, opt_tensors = checkpoint.optimizer_state(optimizer.optimizer)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        payload = {"run_state": state.to_dict(), "config": cfg.to_dict(), "run": run, "grad_scaler": scaler}
        weights = accelerator.unwrap_model(net, keep_torch_compile=False).state_dict()
        checkpoint.write(out, state.global_step, weights, opt_meta, opt_tensors, ranks, payload)
        keep = {state.best["checkpoint"]} if state.best.get("checkpoint") else set()
        for gone in checkpoint.prune(out, cfg.keep_last, keep):
            logger.info(f"deleted old checkpoint {gone.name}")
        logger.info(f"saved checkpoint {path.name}")
    accelerator.wait_for_everyone()
    return path


def restore(path: Path, accelerator: Accelerator, net: Any, optimizer: Any, cfg: TrainConfig, run: dict) -> tuple[RunState, dict]:
    """Load a checkpoint into the model, optimizer and RNGs; return its RunState and this process's progress."""
    saved, model_tensors, opt_tensors, rank_tensors = checkpoint.read(path)
    diffs = resume_differences(saved, cfg, run)
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run would change meaning:\n  " + "\n  ".join(diffs)
                         + "\n  (start a new --output-dir for a different run)")
    accelerator.unwrap_model(net, keep_torch_compile=False).load_state_dict(model_tensors)
    checkpoint.load_optimizer_state(optimizer.optimizer, saved["optimizer"], opt_tensors)
    mine = saved["ranks"][accelerator.process_index]
    checkpoint.set_rng_state(mine, checkpoint.rank_tensors(rank_tensors, accelerator.process_index))
    if accelerator.scaler is not None and saved.get("grad_scaler"):
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    state = RunState.from_dict(saved["run_state"])
    if state.stopped and state.stopped["reason"] != "early_stopping":
        state.stopped = None  # a finished run resumed with more --epochs/--max-steps continues
    logger.info(f"resumed from {path} at epoch {state.epoch + 1}, step {state.global_step}")
    return state, mine["progress"]
