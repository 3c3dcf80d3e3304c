"""PNG figures for the model card and `hubtune evaluate`: confusion matrix, training curves, reliability diagram.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global state, no display needed) and
saved without the "Software" PNG text chunk, so re-rendering the same metrics gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hubtune.files import PLOTS_DIR

if TYPE_CHECKING:
    from hubtune.records import EpochRow, RunRecord

CONFUSION_MATRIX = f"{PLOTS_DIR}/confusion_matrix.png"
TRAINING_CURVES = f"{PLOTS_DIR}/training_curves.png"
RELIABILITY = f"{PLOTS_DIR}/reliability_diagram.png"
MAX_ANNOTATED_CLASSES = 20  # above this, cell counts would overlap; the colours still show the pattern
MAX_TICK_LABELS = 50
DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | Path) -> Path:
    """Draw `matrix[true][pred]` as a heatmap with counts; return the path written.

    Args:
        matrix: square confusion matrix, rows are true classes and columns predicted ones.
        labels: class names in matrix order.
        path: where to write the PNG.
    """
    n = len(labels)
    side = min(max(4.0, 0.45 * n + 2.0), 24.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("Confusion matrix (best epoch, validation)")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), labels, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center")
        ax.set_yticks(range(n), labels)
    if n <= MAX_ANNOTATED_CLASSES:
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if peak and count > peak / 2 else "black")
    return _save(fig, Path(path))


def training_curves(history: list[EpochRow], path: str | Path, best_epoch: int | None = None) -> Path:
    """Draw train/validation loss and validation accuracy/F1 per epoch; return the path written.

    Args:
        history: the per-epoch rows of metrics.json.
        path: where to write the PNG.
        best_epoch: epoch of the exported checkpoint, marked with a dashed line.
    """
    epochs = [row.epoch for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    columns: dict[str, Callable[[EpochRow], float]] = {
        "train_loss": lambda row: row.train_loss, "val_loss": lambda row: row.val.loss,
        "val_accuracy": lambda row: row.val.accuracy, "val_f1": lambda row: row.val.f1}
    for ax, series, title in (
        (loss_ax, (("train_loss", "train loss"), ("val_loss", "validation loss")), "Loss"),
        (score_ax, (("val_accuracy", "validation accuracy"), ("val_f1", "validation F1 (macro)")), "Validation"),
    ):
        for key, label in series:
            ax.plot(epochs, [columns[key](row) for row in history], marker="o", label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    score_ax.set_ylim(-0.02, 1.02)
    return _save(fig, Path(path))


def reliability_diagram(series: list[tuple[str, list[dict[str, Any]], float]], path: str | Path, title: str) -> Path:
    """Draw accuracy against mean confidence per confidence bin, with the examples per bin below; return the path.

    Args:
        series: (name, bins, ECE) per curve, bins as `metrics.describe_bins` writes them (the last one holds the
            confidences of exactly 1.0, drawn with the bin below it).
        path: where to write the PNG.
        title: what was evaluated, for the figure's title.
    """
    fig = Figure(figsize=(6, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / max(len(series[0][1]) - 1, 1) if series else 1.0
    for i, (name, bins, ece) in enumerate(series):
        merged = [dict(row) for row in bins[:-1]]
        last, exact = merged[-1], bins[-1]
        if exact["count"]:
            n = last["count"] + exact["count"]
            for key in ("confidence", "accuracy"):
                last[key] = ((last[key] or 0.0) * last["count"] + exact[key] * exact["count"]) / n
            last["count"] = n
        shown = [row for row in merged if row["count"]]
        top.plot([row["confidence"] for row in shown], [row["accuracy"] for row in shown], marker="o",
                 label=f"{name} (ECE {ece:.4f})")
        offset = (i - (len(series) - 1) / 2) * width / max(len(series), 1)
        bottom.bar([row["lower"] + width / 2 + offset for row in merged], [row["count"] for row in merged],
                   width=width / max(len(series), 1), alpha=0.7, label=name)
    top.set_xlim(-0.01, 1.01)  # points at confidence 1.0 stay whole
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (top-1 softmax probability)")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, Path(path))


def write_plots(metrics: RunRecord, output_dir: str | Path) -> list[str]:
    """Write every figure the card embeds into `output_dir`; return their paths relative to it.

    Args:
        metrics: the run's record (metrics.json).
        output_dir: the run's output directory.
    """
    out = Path(output_dir)
    best, history = metrics.best, metrics.history
    written = []
    if best is not None and best.metrics.confusion_matrix:
        confusion_matrix(best.metrics.confusion_matrix, list(metrics.class_names), out / CONFUSION_MATRIX)
        written.append(CONFUSION_MATRIX)
    if history:
        training_curves(history, out / TRAINING_CURVES, best.epoch if best else None)
        written.append(TRAINING_CURVES)
    calibration = metrics.calibration
    if calibration:
        reliability_diagram([("before", calibration.bins_before, calibration.ece_before),
                             (f"after (T = {calibration.temperature:.3f})", calibration.bins_after,
                              calibration.ece_after)],
                            out / RELIABILITY, "Reliability on the validation split (--calibrate)")
        written.append(RELIABILITY)
    return written
