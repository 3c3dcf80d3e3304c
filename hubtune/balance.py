"""Class imbalance: the training split's label counts, the loss weights of --class-weights, the draw rates of
--balanced-sampling, and the warning for an imbalanced split trained with neither.

Counting is a pass over the training stream's keys and labels (nothing decoded; the image bytes are still read, as
the validation hold-out is decided by a hash of them), each process over its own shard, summed over processes. Only
--class-weights auto and --balanced-sampling need every example counted; otherwise the warning and the card get a
bounded sample, so that a run on a large Hub dataset does not read it twice before its first step.

Both corrections use the inverse frequency n / (k * count) for n training examples of k classes (scikit-learn's
"balanced" weights): 1 for every class of a balanced split, above 1 for the small classes. As a draw rate it keeps
the epoch at about n examples, each class drawn about n / k times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from hubtune import stream
from hubtune.errors import ConfigError, DataError, did_you_mean, get_logger

logger = get_logger("hubtune")

IMBALANCE_RATIO = 3  # a largest class this many times the smallest is warned about when nothing corrects it
SAMPLE_EXAMPLES = 2000  # training examples each process counts when only the warning and the card need the counts
LISTED_CLASSES = 20  # class names an error message lists at most


@dataclass(frozen=True)
class ClassCounts:
    """Training examples per class, summed over processes."""

    per_class: dict[str, int]  # in the order of the dataset's class names
    sample_limit: int | None  # examples each process counted at most (None: the whole split was asked for)
    complete: bool  # every training example was counted

    @property
    def values(self) -> list[int]:
        return list(self.per_class.values())


@dataclass(frozen=True)
class ClassBalance:
    """What a run does about class imbalance: the counts, and the loss weights and draw rates that follow from them."""

    counts: ClassCounts
    loss_weights: torch.Tensor | None  # float32, in class order (--class-weights; None: none)
    draw_rates: tuple[float, ...] | None  # expected draws per epoch of an example of each class (--balanced-sampling)

    def record(self) -> dict[str, Any]:
        """For metrics.json's run_info and the model card."""
        names = list(self.counts.per_class)
        return {
            "train_counts": self.counts.per_class, "complete": self.counts.complete,
            "sample_limit": None if self.counts.complete else self.counts.sample_limit,
            "class_weights": None if self.loss_weights is None else dict(zip(names, self.loss_weights.tolist())),
            "draw_rates": None if self.draw_rates is None else dict(zip(names, self.draw_rates)),
        }


def resolve(train_ds: stream.ExampleStream, class_names: list[str], weights: str | dict[str, float],
            balanced: bool, accelerator: Accelerator) -> ClassBalance:
    """Count the training labels (all of them when `weights` is "auto" or `balanced`, else a sample), derive the loss
    weights and draw rates, and warn (main process) when the split is imbalanced and nothing corrects it.

    Args:
        train_ds: this process's training stream (counted before its draw rates are set).
        class_names: the dataset's classes, in label order.
        weights: TrainConfig.class_weight_spec: "none", "auto" or {class name: weight}.
        balanced: --balanced-sampling.
        accelerator: sums the counts over processes.

    Raises:
        ConfigError: `weights` names a class the dataset does not have.
        DataError: auto weights or balanced sampling, and a class has no training example.
    """
    check_class_names(weights, class_names)
    full = weights == "auto" or balanced
    counts = count_labels(train_ds, class_names, accelerator, limit=None if full else SAMPLE_EXAMPLES)
    loss_weights: torch.Tensor | None = None
    if weights == "auto":
        fix = "give weights with --class-weights CLASS=W"
        loss_weights = torch.tensor(inverse_frequency(counts, "--class-weights auto", fix), dtype=torch.float32)
    elif isinstance(weights, dict):
        loss_weights = torch.tensor([weights.get(name, 1.0) for name in class_names], dtype=torch.float32)
    rates = tuple(inverse_frequency(counts, "--balanced-sampling", "leave it off")) if balanced else None
    warn_if_imbalanced(counts, corrected=loss_weights is not None or balanced)
    if weights == "auto" and balanced:
        logger.warning("--class-weights auto with --balanced-sampling: each corrects the imbalance on its own; "
                       "together they reverse it (a small class weighs as much more than a large one as it weighed "
                       "less without either); use one of them")
    return ClassBalance(counts=counts, loss_weights=loss_weights, draw_rates=rates)


def check_class_names(weights: str | dict[str, float], class_names: list[str]) -> None:
    """Refuse --class-weights CLASS=W naming a class the dataset does not have.

    Raises:
        ConfigError: naming the first unknown class, the closest class names and the dataset's classes.
    """
    if not isinstance(weights, dict):
        return
    unknown = [name for name in weights if name not in class_names]
    if unknown:
        listed = ", ".join(class_names[:LISTED_CLASSES])
        if len(class_names) > LISTED_CLASSES:
            listed += f", ... ({len(class_names):,} in all)"
        raise ConfigError(f"--class-weights: {unknown[0]!r} is not a class of the dataset"
                          f"{did_you_mean(unknown[0], class_names)}; classes: {listed}")


def count_labels(train_ds: stream.ExampleStream, class_names: list[str], accelerator: Accelerator,
                 limit: int | None) -> ClassCounts:
    """Training examples per class from a pass over this process's stream (nothing decoded), stopped after `limit`
    examples when given, summed over processes."""
    n = len(class_names)
    counts, complete = [0] * n, True
    labels = train_ds.labels()
    for read, label in enumerate(labels):
        if limit is not None and read == limit:
            complete = False
            break
        if 0 <= label < n:
            counts[label] += 1
    labels.close()
    both = torch.tensor([*counts, int(complete)], dtype=torch.int64).to(accelerator.device)
    if accelerator.num_processes > 1:  # each process counted its own shard
        both = torch.cat([accelerator.reduce(both[:n], "sum"), accelerator.reduce(both[n:], "min")])
    summed: list[int] = both[:n].tolist()
    return ClassCounts(per_class=dict(zip(class_names, summed)), sample_limit=limit, complete=bool(both[n]))


def inverse_frequency(counts: ClassCounts, flag: str, instead: str) -> list[float]:
    """n / (k * count) per class, for n examples of k classes (`flag` and `instead` word the error).

    Raises:
        DataError: a class has no training example (its inverse frequency is undefined).
    """
    empty = [name for name, c in counts.per_class.items() if c == 0]
    if empty:
        raise DataError(f"{flag}: class {empty[0]!r} has no training example ({len(empty)} class(es) without any; "
                        f"counts: {_shown(counts)}); add images of it, or {instead}")
    total, k = sum(counts.values), len(counts.values)
    return [total / (k * c) for c in counts.values]


def warn_if_imbalanced(counts: ClassCounts, corrected: bool) -> None:
    """One warning (main process) when the largest class has IMBALANCE_RATIO times the examples of the smallest and
    neither --class-weights nor --balanced-sampling is set."""
    largest = max(counts.per_class, key=lambda name: counts.per_class[name])
    smallest = min(counts.per_class, key=lambda name: counts.per_class[name])
    most, least = counts.per_class[largest], counts.per_class[smallest]
    if corrected or most == 0 or most < IMBALANCE_RATIO * least:
        return
    where = "" if counts.complete else (f" in the first {counts.sample_limit:,} training examples of each process "
                                        "(a sample, which a split stored sorted by class also fails; --class-weights "
                                        "auto and --balanced-sampling count them all)")
    ratio = f"{most / least:.1f} times as many" if least else "the smallest has none"
    logger.warning(f"imbalanced training split{where}: class {largest!r} has {most:,} examples, {smallest!r} "
                   f"{least:,} ({ratio}; counts: {_shown(counts)}); a model can score well while ignoring the small "
                   "classes: pass --class-weights auto (inverse-frequency loss weights) or --balanced-sampling "
                   "(every class drawn about equally each epoch), and consider --metric val_f1 (macro F1)")


def _shown(counts: ClassCounts) -> str:
    items = list(counts.per_class.items())
    shown = ", ".join(f"{name} {c:,}" for name, c in items[:LISTED_CLASSES])
    return shown + (f", ... ({len(items):,} classes)" if len(items) > LISTED_CLASSES else "")
