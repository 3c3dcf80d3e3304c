"""The records of a run's results that cross modules: what `metrics.evaluate` measures, the epoch rows (with their
EMA's metrics), the best and stop records, --calibrate's temperature, the run information and the run record
(metrics.json). A checkpoint's state.json holds the same rows and records (run_state.RunState).

Each is a frozen dataclass: `to_json` writes exactly the keys metrics.json and state.json have always held, in the
same order; `from_json` reads them back, files written before newer keys existed included (the fallbacks live here,
not in the readers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from hubtune.config import METRICS

if TYPE_CHECKING:  # only annotations: the CLI imports this module before torch
    import torch

Weights = Literal["model", "ema"]


@dataclass(frozen=True)
class ClassScores:
    """One class's validation precision, recall, F1 and support (its true examples)."""

    precision: float
    recall: float
    f1: float
    support: int

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "support": self.support}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClassScores:
        return cls(precision=d["precision"], recall=d["recall"], f1=d["f1"], support=d["support"])


def per_class_json(per_class: dict[str, ClassScores]) -> dict[str, dict[str, Any]]:
    """Per-class scores as JSON, in the classifier's index order (the order they were computed in)."""
    return {name: scores.to_json() for name, scores in per_class.items()}


def per_class_from_json(d: dict[str, dict[str, Any]] | None) -> dict[str, ClassScores]:
    return {name: ClassScores.from_json(scores) for name, scores in (d or {}).items()}


@dataclass(frozen=True)
class Uncalibrated:
    """With a temperature: the loss, ECE and calibration bins of the logits as the model gives them."""

    loss: float
    ece: float
    calibration_bins: torch.Tensor


@dataclass(frozen=True)
class EvalMetrics:
    """What `metrics.evaluate` measures over a whole evaluation stream (all processes together)."""

    accuracy: float
    f1: float  # macro: the unweighted mean of the per-class F1
    per_class: dict[str, ClassScores]  # in the classifier's index order
    confusion_matrix: list[list[int]]  # [true][predicted]
    loss: float
    examples: int
    skipped: int  # images that could not be decoded
    ece: float
    calibration_bins: torch.Tensor  # metrics.calibration_bins rows
    uncalibrated: Uncalibrated | None = None  # only when evaluated with a temperature


@dataclass(frozen=True)
class ValMetrics:
    """One set of weights' validation metrics in an epoch's row: the model's, or its EMA's (--model-ema)."""

    loss: float
    accuracy: float
    f1: float
    per_class: dict[str, ClassScores] = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)  # [true][predicted]

    @classmethod
    def of(cls, result: EvalMetrics) -> ValMetrics:
        return cls(loss=result.loss, accuracy=result.accuracy, f1=result.f1, per_class=result.per_class,
                   confusion_matrix=result.confusion_matrix)

    def score(self, metric: str) -> float:
        """The value of a --metric choice (val_loss, val_accuracy, val_f1)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return {"val_loss": self.loss, "val_accuracy": self.accuracy, "val_f1": self.f1}[metric]

    def to_json(self) -> dict[str, Any]:
        return {"val_loss": self.loss, "val_accuracy": self.accuracy, "val_f1": self.f1,
                "per_class": per_class_json(self.per_class), "confusion_matrix": self.confusion_matrix}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ValMetrics:
        # (a metric the row lacks reads as 0.0: rows written by hand in tests, never by hubtune)
        return cls(loss=d.get("val_loss", 0.0), accuracy=d.get("val_accuracy", 0.0), f1=d.get("val_f1", 0.0),
                   per_class=per_class_from_json(d.get("per_class")), confusion_matrix=d.get("confusion_matrix", []))


@dataclass(frozen=True)
class Skipped:
    """Images that could not be decoded, over all processes."""

    train: int = 0
    val: int = 0

    def to_json(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Skipped:
        return cls(train=(d or {}).get("train", 0), val=(d or {}).get("val", 0))


@dataclass(frozen=True)
class EpochRow:
    """One epoch of metrics.json's history (and of a checkpoint's)."""

    epoch: int  # 1-based
    step: int  # optimizer steps at the end of the epoch
    train_loss: float
    val: ValMetrics
    train_examples: int
    val_examples: int
    skipped: Skipped
    ema: ValMetrics | None = None  # --model-ema only

    def to_json(self) -> dict[str, Any]:
        val = self.val.to_json()
        out = {"epoch": self.epoch, "step": self.step, "train_loss": self.train_loss,
               "val_loss": val["val_loss"], "val_accuracy": val["val_accuracy"], "val_f1": val["val_f1"],
               "train_examples": self.train_examples, "val_examples": self.val_examples,
               "per_class": val["per_class"], "confusion_matrix": val["confusion_matrix"],
               "skipped_images": self.skipped.to_json()}
        if self.ema is not None:
            out["ema"] = self.ema.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpochRow:
        return cls(epoch=d["epoch"], step=d["step"], train_loss=d.get("train_loss", 0.0), val=ValMetrics.from_json(d),
                   train_examples=d.get("train_examples", 0), val_examples=d.get("val_examples", 0),
                   skipped=Skipped.from_json(d.get("skipped_images")),
                   ema=ValMetrics.from_json(d["ema"]) if d.get("ema") else None)

    def weights(self, which: Weights) -> ValMetrics:
        """The metrics of the raw weights ("model") or of their EMA ("ema")."""
        if which == "ema":
            if self.ema is None:
                raise ValueError(f"epoch {self.epoch} has no EMA metrics (the run was without --model-ema)")
            return self.ema
        return self.val


@dataclass(frozen=True)
class BestRecord:
    """The best evaluation so far: its epoch, which weights won (the model's or the EMA's) and their checkpoint.

    metrics.json writes it as the epoch's row with the winning weights' metrics at the top level (and the row's
    "ema" kept), then "weights" and "checkpoint": `row.val` holds the winner's metrics, the EMA's when weights is
    "ema" (the raw weights' metrics of that epoch are in the history).
    """

    row: EpochRow
    weights: Weights | None = "model"  # None: not recorded (runs before --model-ema, an export's fallback): the model's
    checkpoint: str | None = None  # the step folder holding these weights

    @classmethod
    def of(cls, row: EpochRow, weights: Weights, checkpoint: str | None = None) -> BestRecord:
        return cls(row=replace(row, val=row.weights(weights)), weights=weights, checkpoint=checkpoint)

    @property
    def epoch(self) -> int:
        return self.row.epoch

    @property
    def ema(self) -> bool:
        """Whether the EMA's weights won (and the checkpoint's ema.safetensors is what gets exported)."""
        return self.weights == "ema"

    @property
    def metrics(self) -> ValMetrics:
        """The winning weights' validation metrics."""
        return self.row.val

    def to_json(self) -> dict[str, Any]:
        out = self.row.to_json()
        if self.weights is not None:
            out["weights"] = self.weights
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BestRecord:
        return cls(row=EpochRow.from_json(d), weights=d.get("weights"), checkpoint=d.get("checkpoint"))


@dataclass(frozen=True)
class StopRecord:
    """Why and where the run stopped."""

    reason: str  # early_stopping, max_epochs, max_steps
    epoch: int
    step: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "epoch": self.epoch, "step": self.step, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StopRecord:
        return cls(reason=d["reason"], epoch=d.get("epoch", 0), step=d.get("step", 0), detail=d.get("detail", ""))


@dataclass(frozen=True)
class Failure:
    """An upload that did not reach the Hub: what it was (a checkpoint or snapshot folder name) and why."""

    name: str
    error: str


@dataclass(frozen=True)
class BackgroundPushes:
    """--push-every-save: the snapshots pushed while training went on, and those whose push failed."""

    pushed: tuple[str, ...] = ()
    failed: tuple[Failure, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"pushed": list(self.pushed), "failed": [{"item": f.name, "error": f.error} for f in self.failed]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackgroundPushes:
        return cls(tuple(d.get("pushed") or ()), tuple(Failure(f["item"], f["error"]) for f in d.get("failed") or ()))


@dataclass(frozen=True)
class CheckpointUploads:
    """--hub-checkpoints: which checkpoints reached the Hub branch, which failed and why, which a newer one replaced
    before their turn."""

    repo: str
    branch: str
    uploaded: tuple[str, ...] = ()
    failed: tuple[Failure, ...] = ()
    superseded: tuple[str, ...] = ()

    def failure(self, name: str) -> str | None:
        """Why checkpoint `name` did not reach the Hub, if its upload failed."""
        return next((f.error for f in self.failed if f.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "branch": self.branch, "uploaded": list(self.uploaded),
                "failed": [{"checkpoint": f.name, "error": f.error} for f in self.failed],
                "superseded": list(self.superseded)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointUploads:
        return cls(d["repo"], d["branch"], tuple(d.get("uploaded") or ()),
                   tuple(Failure(f["checkpoint"], f["error"]) for f in d.get("failed") or ()),
                   tuple(d.get("superseded") or ()))


def best_from_json(d: dict[str, Any] | None) -> BestRecord | None:
    """The best record of state.json or metrics.json; None for `{}` (no evaluation yet)."""
    return BestRecord.from_json(d) if d else None


def stop_from_json(d: dict[str, Any] | None) -> StopRecord | None:
    return StopRecord.from_json(d) if d else None


@dataclass(frozen=True)
class ExportFallback:
    """The best checkpoint was damaged when the run ended: which one was wanted, and the intact one exported."""

    wanted: str
    wanted_epoch: int
    exported: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"wanted": self.wanted, "wanted_epoch": self.wanted_epoch, "exported": self.exported,
                "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExportFallback:
        return cls(wanted=d["wanted"], wanted_epoch=d["wanted_epoch"], exported=d["exported"], reason=d["reason"])


@dataclass(frozen=True)
class Calibration:
    """--calibrate: the softmax temperature fitted on the validation split, and ECE/NLL before and after it."""

    temperature: float
    examples: int
    n_bins: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    bins_before: list[dict[str, Any]]  # metrics.describe_bins rows
    bins_after: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "examples": self.examples, "n_bins": self.n_bins,
                "ece_before": self.ece_before, "ece_after": self.ece_after, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "bins_before": self.bins_before, "bins_after": self.bins_after}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        return cls(**{name: d[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RunInfo:
    """What metrics.json's "run_info" records to make the run reproducible (report.run_info, and the validation and
    class-balance records build_job adds). Every field is None in outputs written before it existed; the nested
    records stay JSON objects (the card template reads them as they are written)."""

    base_model: dict[str, Any] | None = None  # id, revision, spec, license
    dataset: dict[str, Any] | None = None  # id, revision, is_hub
    val_source: str | None = None  # data.ValSplit's JSON form
    parameters: dict[str, Any] | None = None  # total, trainable, frozen
    frozen_groups: list[str] | None = None
    freeze: str | None = None
    freeze_bn: bool | None = None
    devices: dict[str, Any] | None = None  # type, count, name
    mixed_precision: str | None = None
    effective_batch_size: int | None = None
    versions: dict[str, str] | None = None
    command: str | None = None
    validation: dict[str, Any] | None = None  # validation images per class, the classes with few
    class_balance: dict[str, Any] | None = None  # balance.Imbalance.record()
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer hubtune, kept as they are

    def to_json(self) -> dict[str, Any]:
        if not self.extra and all(getattr(self, name) is None for name in self.known()):
            return {}  # (outputs without run_info)
        return {**{name: getattr(self, name) for name in self.known()}, **self.extra}

    @classmethod
    def known(cls) -> list[str]:
        return [name for name in cls.__dataclass_fields__ if name != "extra"]

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> RunInfo:
        d = d or {}
        names = cls.known()
        return cls(**{k: d.get(k) for k in names}, extra={k: v for k, v in d.items() if k not in names})


@dataclass(frozen=True)
class RunRecord:
    """metrics.json: a finished run's history, best and stop records, counts, wall time and run information.

    `from_json` reads files of every hubtune version: keys added later read as None (or as what they meant then),
    so the card renders "unknown" for them.
    """

    history: list[EpochRow]
    best: BestRecord | None
    stopped: StopRecord | None
    class_names: list[str]
    train_examples: int | None = None
    val_examples: int | None = None
    examples_seen: int | None = None
    skipped: Skipped | None = None
    global_step: int | None = None
    dataset_revision: str | None = None
    num_processes: int | None = None
    wall_time_s: float | None = None
    segments: int = 1  # (older runs were never resumed as segments)
    run_info: RunInfo = field(default_factory=RunInfo)
    # written after training, each only when it applies
    export_fallback: ExportFallback | None = None
    calibration: Calibration | None = None  # --calibrate
    background_pushes: BackgroundPushes | None = None  # --push-every-save's snapshots during training
    hub_checkpoints: CheckpointUploads | None = None  # --hub-checkpoints: where the checkpoints went
    _OPTIONAL = ("export_fallback", "calibration", "background_pushes", "hub_checkpoints")  # in the order written

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "history": [row.to_json() for row in self.history],
            "best": self.best.to_json() if self.best else {},
            "stopped": self.stopped.to_json() if self.stopped else None,
            "train_examples": self.train_examples, "val_examples": self.val_examples,
            "examples_seen": self.examples_seen, "skipped_images": self.skipped.to_json() if self.skipped else None,
            "global_step": self.global_step, "class_names": self.class_names,
            "dataset_revision": self.dataset_revision, "num_processes": self.num_processes,
            "wall_time_s": self.wall_time_s, "segments": self.segments, "run_info": self.run_info.to_json(),
        }
        for key in self._OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunRecord:
        skipped = d.get("skipped_images")
        return cls(
            history=[EpochRow.from_json(row) for row in d.get("history") or []],
            best=best_from_json(d.get("best")), stopped=stop_from_json(d.get("stopped")),
            class_names=list(d["class_names"]), train_examples=d.get("train_examples"),
            val_examples=d.get("val_examples"), examples_seen=d.get("examples_seen"),
            skipped=Skipped.from_json(skipped) if skipped else None, global_step=d.get("global_step"),
            dataset_revision=d.get("dataset_revision"), num_processes=d.get("num_processes"),
            wall_time_s=d.get("wall_time_s"), segments=d.get("segments", 1),
            run_info=RunInfo.from_json(d.get("run_info")),
            export_fallback=ExportFallback.from_json(d["export_fallback"]) if d.get("export_fallback") else None,
            background_pushes=BackgroundPushes.from_json(d["background_pushes"]) if d.get("background_pushes")
            else None,
            hub_checkpoints=CheckpointUploads.from_json(d["hub_checkpoints"]) if d.get("hub_checkpoints") else None,
            calibration=Calibration.from_json(d["calibration"]) if d.get("calibration") else None,
        )
