"""Run bookkeeping that a checkpoint carries: progress, history, best model, early stopping, resume checks."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import gather_object

from hubtune import checkpoint, resume_checks, unfreeze
from hubtune.config import TrainConfig, policy_fields
from hubtune.errors import CheckpointError, ConfigError, get_logger
from hubtune.records import BestRecord, EpochRow, StopRecord, Weights, best_from_json, stop_from_json

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from timm.utils import ModelEmaV3

    from hubtune.job import Job
    from hubtune.stream import Batch

logger = get_logger("hubtune")


@dataclass
class EpochProgress:
    """One process's position in the epoch in progress: sums for the epoch's train loss and decode counters, and
    the loader state after the last batch trained on (what a checkpoint saved mid-epoch restores)."""

    loss_sum: float = 0.0
    n: int = 0
    bad: int = 0
    seen: int = 0
    loader: dict[str, Any] | None = None
    rest: Iterable[Batch] = ()  # batches read but not trained on when the processes stopped together (not saved)

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.n += n

    def advance(self, position: dict[str, Any]) -> None:
        """Move to the position after a batch: {"loader": state, "bad": count, "seen": count}."""
        self.loader, self.bad, self.seen = position["loader"], position["bad"], position["seen"]

    def to_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "n": self.n, "bad": self.bad, "seen": self.seen, "loader": self.loader}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochProgress:
        return cls(**{k: d[k] for k in ("loss_sum", "n", "bad", "seen", "loader") if k in d})


@dataclass
class RunState:
    """Everything about progress that is not a tensor; saved as JSON in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    global_step: int = 0
    in_epoch: bool = False  # saved inside an epoch: the data position is restored, not restarted
    steps_per_epoch: int | None = None
    history: list[EpochRow] = field(default_factory=list)
    best: BestRecord | None = None  # None until the first evaluation
    bad_evals: int = 0  # evaluations since the metric last improved (early stopping)
    stopped: StopRecord | None = None
    examples_seen: int = 0
    elapsed_s: float = 0.0  # wall time of the earlier segments of a resumed run, up to their last checkpoint
    segments: int = 0  # earlier segments (processes that trained this run and were interrupted)

    def to_dict(self) -> dict[str, Any]:
        """state.json's "run_state" (no best yet: {}, as it has always been written)."""
        out = asdict(self)
        out.update(history=[row.to_json() for row in self.history], best=self.best.to_json() if self.best else {},
                   stopped=self.stopped.to_json() if self.stopped else None)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.update(history=[EpochRow.from_json(row) for row in d.get("history") or []],
                     best=best_from_json(d.get("best")), stopped=stop_from_json(d.get("stopped")))
        return cls(**known)


@dataclass(frozen=True)
class BestPolicy:
    """What picks the best evaluation and stops the run early: --metric, its direction, patience and min delta."""

    metric: str
    higher_is_better: bool
    patience: int | None = None
    min_delta: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> BestPolicy:
        return cls(cfg.metric, cfg.higher_is_better, cfg.early_stopping_patience, cfg.early_stopping_min_delta)


def update_best(state: RunState, row: EpochRow, policy: BestPolicy, checkpoint_name: str | None = None) -> bool:
    """Record an evaluation; return True if it is the new best. Sets state.stopped on early stopping.

    With --model-ema the row also holds the EMA weights' metrics (row.ema); the best of the two counts, and the
    best record takes that one's metrics and says which weights they are. `checkpoint_name`: the step folder that
    will hold this evaluation's weights.
    """
    metric = policy.metric
    candidates: list[Weights] = ["model", "ema"] if row.ema is not None else ["model"]
    sign = 1 if policy.higher_is_better else -1
    # the first of equals: the raw weights
    chosen = max(candidates, key=lambda which: sign * row.weights(which).score(metric))
    value = row.weights(chosen).score(metric)
    if state.best is not None:
        gain = sign * (value - state.best.metrics.score(metric))
        improved = gain > policy.min_delta
    else:
        improved = True
    if improved:
        state.best = BestRecord.of(row, chosen, checkpoint_name)
        state.bad_evals = 0
    else:
        state.bad_evals += 1
    patience = policy.patience
    if patience and state.bad_evals >= patience and state.best is not None:
        state.stopped = StopRecord(
            reason="early_stopping", epoch=row.epoch, step=row.step,
            detail=f"{metric} did not improve by more than {policy.min_delta} for {patience} "
                   f"evaluation(s); best {state.best.metrics.score(metric):.6g} at epoch {state.best.epoch}",
        )
    return improved


def resume_differences(saved: dict[str, Any], cfg: TrainConfig, run: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run and this one, one message per difference."""
    diffs = []
    old_cfg = saved["config"]
    for key in policy_fields("resume"):  # the fields that declare they must match
        old = old_cfg.get(key, TrainConfig.__dataclass_fields__[key].default)  # older checkpoints: the default
        if old != getattr(cfg, key):
            diffs.append(f"--{key.replace('_', '-')}: checkpoint has {old!r}, this run has "
                         f"{getattr(cfg, key)!r}")
    for key, what in (("dataset_revision", "dataset revision"), ("model_revision", "base model revision"),
                      ("class_names", "classes"), ("val_source", "validation split"),
                      ("num_processes", "number of processes")):
        if key in saved["run"] and saved["run"][key] != run.get(key):  # (older checkpoints did not record all)
            diffs.append(f"{what}: checkpoint has {saved['run'].get(key)!r}, this run has {run.get(key)!r}")
    return diffs


class StopRequest:
    """SIGTERM/SIGINT set a flag; training saves a checkpoint at the next step boundary and exits.

    A second Ctrl-C interrupts at once (the latest complete checkpoint is still there).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def save_checkpoint(job: Job) -> Path:
    """Gather every process's RNG and data position, then the main process writes one atomic checkpoint."""
    accelerator, out, state, cfg = job.accelerator, job.out, job.state, job.cfg
    rng_meta, rng_tensors = checkpoint.rng_state()
    mine = ({**rng_meta, "progress": job.progress.to_dict()}, rng_tensors)
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    path = checkpoint.step_dir(out, state.global_step)
    if accelerator.is_main_process:
        opt_meta, opt_tensors = checkpoint.optimizer_state(job.optimizer.optimizer)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        # the wall time so far, this segment included: a resumed run continues the count
        run_state = {**state.to_dict(), "elapsed_s": state.elapsed_s + time.time() - job.started,
                     "segments": state.segments + 1}
        payload = {"run_state": run_state, "config": cfg.to_dict(), "run": job.run, "grad_scaler": scaler}
        weights = job.net.state_dict()
        frozen = set(job.frozen)  # the EMA of a frozen parameter is the parameter itself: not saved twice
        ema = {k: v for k, v in job.ema.module.state_dict().items() if k not in frozen} if job.ema else None
        payload["unfrozen"] = [token for start, token, _ in job.unfreeze_at if start <= state.epoch + int(state.in_epoch)]
        checkpoint.write(out, state.global_step, weights, opt_meta, opt_tensors, ranks, payload, ema)
        keep = {state.best.checkpoint} if state.best and state.best.checkpoint else set()
        for gone in checkpoint.prune(out, cfg.keep_last, keep):
            logger.info(f"deleted old checkpoint {gone.name}")
        logger.info(f"saved checkpoint {path.name}")
        if job.uploader is not None:  # the branch keeps what retention kept here
            job.uploader.submit(path, [p.name for p in checkpoint.listing(out)])
    accelerator.wait_for_everyone()
    return path


@dataclass(frozen=True)
class ResumeTarget:
    """What a checkpoint is restored into, as build_job assembled it before the first step: the modules and the
    optimizer (loaded in place), and what --unfreeze-at's replay starts from."""

    cfg: TrainConfig  # compared with the checkpoint's (resume_differences)
    run: dict[str, Any]  # what must match beside the config (see resume_differences)
    out: Path  # where older checkpoints are looked for
    accelerator: Accelerator
    net: torch.nn.Module
    ema: ModelEmaV3 | None
    optimizer: Any  # Accelerate's prepared optimizer
    stepped: torch.nn.Module
    unfreeze_at: unfreeze.Schedule
    frozen: list[str]  # the parameters frozen at the start (--freeze)
    thaw: unfreeze.ThawSettings
    steps_per_epoch: int | None  # from the dataset's metadata, for checkpoints saved before it was known


@dataclass(frozen=True)
class Restored:
    """What a restored checkpoint changed besides the modules' and optimizer's state: the run state, this process's
    data position, and (after --unfreeze-at's replay) the parameters still frozen and the module that steps."""

    state: RunState
    progress: EpochProgress
    frozen: list[str]
    stepped: torch.nn.Module


def resume(target: ResumeTarget, path: Path, named: bool) -> tuple[Path, Restored]:
    """Restore checkpoint `path`, or, when the user did not name it (--resume latest, hub), the newest older one
    that loads, with a warning for each that does not (as for a damaged one); return the one restored and what it
    changed.

    Raises:
        CheckpointError: a named checkpoint cannot be loaded, or none can.
        ConfigError: the checkpoint is of another run (see resume_differences).
    """
    while True:
        groups = len(target.optimizer.optimizer.param_groups)
        try:
            return path, restore(target, path)
        except CheckpointError as err:
            # not after a failure that followed the replay of --unfreeze-at: the optimizer has that epoch's groups now
            replayed = len(target.optimizer.optimizer.param_groups) != groups
            usable = resume_checks.check_saved
            previous = None if named or replayed else checkpoint.newest_usable(target.out, usable, below=path)
            if previous is None:
                raise
            logger.warning(f"checkpoint {path.name} cannot be loaded: {err}; trying the previous one, {previous.name}")
            path = previous


def restore(job: ResumeTarget, path: Path) -> Restored:
    """Load a checkpoint into the target: model, optimizer (after replaying --unfreeze-at up to the checkpoint's
    epoch, so the optimizer has the groups it had), EMA weights, RNGs; return the run state and this process's data
    position.

    Everything that can be checked against the job is checked before anything is loaded.

    Raises:
        CheckpointError: the checkpoint does not fit this model or its optimizer, or cannot be loaded.
        ConfigError: it is of another run.
    """
    saved, model_tensors, opt_tensors, rank_tensors = checkpoint.read(path)
    resume_checks.check_state(path, saved, opt_tensors, rank_tensors)
    accelerator = job.accelerator
    diffs = resume_differences(saved, job.cfg, job.run)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the run would change meaning:\n  " + "\n  ".join(diffs)
                          + "\n  (start a new --output-dir for a different run)")
    if len(saved["ranks"]) != accelerator.num_processes:  # (checkpoints that do not record num_processes in "run")
        raise ConfigError(f"cannot resume from {path}: it was saved by {len(saved['ranks'])} process(es), this run "
                          f"has {accelerator.num_processes}; resume with as many")
    ema = checkpoint.load_ema(path) if job.ema is not None else {}
    resume_checks.check_fits(path, "model weights", model_tensors, job.net.state_dict(), exact=True)
    if job.ema is not None:
        resume_checks.check_fits(path, "EMA weights", ema, job.ema.module.state_dict(), exact=False)
    saved_state = RunState.from_dict(saved["run_state"])
    frozen, stepped = job.frozen, job.stepped
    for epoch in range(1, saved_state.epoch + 1 + int(saved_state.in_epoch)):  # in order, as the run did
        thawed = unfreeze.apply(job.net, job.optimizer, accelerator, stepped, job.unfreeze_at, frozen, job.thaw, epoch)
        if thawed is not None:
            frozen, stepped = thawed.frozen, thawed.stepped
    optimizer_state = checkpoint.join_tensors(saved["optimizer"], opt_tensors)
    resume_checks.check_optimizer(path, optimizer_state, job.optimizer.optimizer)
    mine = saved["ranks"][accelerator.process_index]
    try:
        job.net.load_state_dict(model_tensors)
        checkpoint.load_optimizer_state(job.optimizer.optimizer, saved["optimizer"], opt_tensors)
        if job.ema is not None:
            job.ema.module.load_state_dict({**model_tensors, **ema})
        checkpoint.set_rng_state(mine, checkpoint.rank_tensors(rank_tensors, accelerator.process_index))
        if accelerator.scaler is not None and saved.get("grad_scaler"):
            accelerator.scaler.load_state_dict(saved["grad_scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if saved_state.stopped and saved_state.stopped.reason != "early_stopping":
        saved_state.stopped = None  # a finished run resumed with more --epochs/--max-steps continues
    saved_state.steps_per_epoch = saved_state.steps_per_epoch or job.steps_per_epoch
    logger.info(f"resumed from {path} at epoch {saved_state.epoch + 1}, step {saved_state.global_step}")
    return Restored(state=saved_state, progress=EpochProgress.from_dict(mine["progress"]), frozen=frozen,
                    stepped=stepped)
