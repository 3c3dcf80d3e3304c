"""Classification metrics from a confusion matrix, calibration bins, bootstrap intervals, and the evaluation pass
that builds them over all processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from hubtune.records import EvalMetrics, Uncalibrated, per_class_from_json

if TYPE_CHECKING:
    from hubtune.stream import Batch

N_BINS = 15  # expected calibration error: equal-width confidence bins, as torchmetrics' default
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95


def _scores(tp: torch.Tensor, support: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-class (precision, recall, F1) along the last dimension; 0 where undefined (nothing predicted or present)."""
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return precision, recall, f1


def from_confusion(conf: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support from conf[true, pred]."""
    conf = conf.to(torch.float64)
    tp = conf.diag()
    support = conf.sum(1)
    predicted = conf.sum(0)
    precision, recall, f1 = _scores(tp, support, predicted)
    total = conf.sum().item()
    return {
        "accuracy": tp.sum().item() / total if total else 0.0,
        "f1": f1.mean().item(),
        "per_class": {
            name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                   "support": int(support[i].item())}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": conf.to(torch.long).tolist(),
    }


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """Per-bin (count, confidence sum, correct sum) of the top-1 softmax confidence: a (n_bins + 1) x 3 float64
    tensor whose rows add up exactly across processes and batches.

    Bins are torchmetrics' (MulticlassCalibrationError): [k/n, (k+1)/n) for k < n, found with
    `bucketize(right=True)` on float32 confidences, and a last row for a confidence of exactly 1.0.
    """
    probs = logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=confidence.device)
    index = torch.bucketize(confidence, boundaries, right=True) - 1
    rows = torch.stack([torch.ones_like(confidence), confidence, predicted.eq(labels).float()], dim=1).double()
    return torch.zeros(n_bins + 1, 3, dtype=torch.float64, device=confidence.device).index_add_(0, index, rows)


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE (L1) from `calibration_bins` rows: sum over bins of |accuracy - mean confidence| x share of examples."""
    bins = bins.to(torch.float64).cpu()
    count, confidence, correct = bins.unbind(dim=1)
    total = count.sum().item()
    if not total:
        return 0.0
    return ((correct - confidence).abs().sum() / total).item()  # |acc - conf| x count/total, bin by bin


def describe_bins(bins: torch.Tensor) -> list[dict[str, Any]]:
    """The bins as JSON rows: lower/upper edge, count, mean confidence and accuracy (None when empty)."""
    n_bins = len(bins) - 1
    rows = []
    for k, (count, confidence, correct) in enumerate(bins.to(torch.float64).cpu().tolist()):
        lower, upper = min(k, n_bins) / n_bins, min(k + 1, n_bins) / n_bins
        rows.append({"lower": round(lower, 6), "upper": round(upper, 6), "count": int(count),
                     "confidence": confidence / count if count else None,
                     "accuracy": correct / count if count else None})
    return rows


def bootstrap_intervals(conf: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = CONFIDENCE_LEVEL) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro F1, {"accuracy": [low, high], "f1": [low, high]}.

    Both depend on the examples only through their (true, predicted) cell of the confusion matrix, so resampling N
    examples with replacement is drawing N cells with the matrix's frequencies: the interval is computed from the
    matrix that every process already reduced, without gathering per-example predictions, and it is the same
    whatever the number of processes. Seeded: the same matrix always gives the same interval.
    """
    n = conf.shape[0]
    flat = conf.to(torch.float64).flatten().cpu()
    total = flat.sum()
    if total == 0:
        return {"accuracy": [0.0, 0.0], "f1": [0.0, 0.0]}
    cells = flat.nonzero().squeeze(1)
    true, pred = cells // n, cells % n
    share = flat[cells] / total
    rng = np.random.default_rng(seed)
    diagonal = true == pred
    per_chunk = max(1, 2**22 // len(cells))  # resamples drawn at once: their cell counts stay under 32 MB
    accuracy, f1 = [], []
    for start in range(0, resamples, per_chunk):
        b = min(per_chunk, resamples - start)
        # numpy's multinomial draws the cell counts of whole resamples (one binomial per cell, in C): the cost grows
        # with the number of distinct cells, not with the number of examples
        counts = torch.from_numpy(rng.multinomial(int(total.item()), share.numpy(), size=b)).to(torch.float64)

        def per_class(index: torch.Tensor, values: torch.Tensor, b: int = b) -> torch.Tensor:
            return torch.zeros(b, n, dtype=torch.float64).index_add_(1, index, values)

        tp = per_class(true[diagonal], counts[:, diagonal])
        accuracy.append(tp.sum(1) / total)
        f1.append(_scores(tp, per_class(true, counts), per_class(pred, counts))[2].mean(1))
    tail = (1 - level) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return {"accuracy": torch.quantile(torch.cat(accuracy), q).tolist(), "f1": torch.quantile(torch.cat(f1), q).tolist()}


@torch.no_grad()
def evaluate(predict: Callable[[Batch], torch.Tensor], loader: Any, accelerator: Any,
             class_names: list[str], targets: torch.Tensor | None = None,
             temperature: float | None = None) -> EvalMetrics:
    """Loss and metrics over the whole validation stream; every example counted once across processes.

    Each process evaluates only its own shard and the sums (confusion matrix, loss, calibration bins, counts) are
    reduced, which is exact without the padding/deduplication that gathering per-example predictions would need.
    `predict` maps a loader batch to logits (the caller puts the model in eval mode); `targets`, when given, maps the
    loader's label indices to the model's (datasets whose classes are named or ordered differently). With a
    `temperature`, loss and calibration are of the logits divided by it, and `uncalibrated` holds the loss and ECE
    of the logits as they are (predictions do not change).
    """
    n = len(class_names)
    device = accelerator.device
    conf = torch.zeros(n * n, dtype=torch.float64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, loss without the temperature
    bins = torch.zeros(2, N_BINS + 1, 3, dtype=torch.float64, device=device)  # with, without the temperature
    bad = 0
    for batch in loader:
        bad += batch.n_bad
        if not len(batch.labels):
            continue
        y = batch.labels if targets is None else targets[batch.labels]
        y = y.to(device, non_blocking=True)
        raw = predict(batch).float()
        logits = raw if temperature is None else raw / temperature
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        bins[0] += calibration_bins(logits, y)
        if temperature is not None:
            sums[1] += F.cross_entropy(raw, y, reduction="sum").double()
            bins[1] += calibration_bins(raw, y)
        conf += torch.bincount(y * n + logits.argmax(1), minlength=n * n).double()
    totals = torch.cat([conf, sums, bins.flatten(), torch.tensor([float(bad)], dtype=torch.float64, device=device)])
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    totals = totals.cpu()
    conf = totals[: n * n].view(n, n)
    sums, bins = totals[n * n : n * n + 2], totals[n * n + 2 : -1].view(2, N_BINS + 1, 3)
    examples = int(conf.sum().item())
    scores = from_confusion(conf, class_names)
    uncalibrated = None
    if temperature is not None:
        uncalibrated = Uncalibrated(loss=sums[1].item() / max(examples, 1), ece=expected_calibration_error(bins[1]),
                                    calibration_bins=bins[1])
    return EvalMetrics(
        accuracy=scores["accuracy"], f1=scores["f1"], per_class=per_class_from_json(scores["per_class"]),
        confusion_matrix=scores["confusion_matrix"], loss=sums[0].item() / max(examples, 1), examples=examples,
        skipped=int(totals[-1].item()), ece=expected_calibration_error(bins[0]), calibration_bins=bins[0],
        uncalibrated=uncalibrated,
    )
