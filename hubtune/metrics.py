"""Classification metrics from a confusion matrix, and the evaluation pass that builds it over all processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def from_confusion(conf: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support from conf[true, pred]."""
    conf = conf.to(torch.float64)
    tp = conf.diag()
    support = conf.sum(1)
    predicted = conf.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
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


@torch.no_grad()
def evaluate(predict: Callable[[dict], torch.Tensor], loader: Any, accelerator: Any,
             class_names: list[str], targets: torch.Tensor | None = None) -> dict[str, Any]:
    """Loss and metrics over the whole validation stream; every example counted once across processes.

    Each process evaluates only its own shard and the sums (confusion matrix, loss, counts) are reduced, which
    is exact without the padding/deduplication that gathering per-example predictions would need. `predict`
    maps a loader batch to logits (the caller puts the model in eval mode); `targets`, when given, maps the
    loader's label indices to the model's (datasets whose classes are named or ordered differently).
    """
    n = len(class_names)
    device = accelerator.device
    conf = torch.zeros(n * n, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad = 0
    for batch in loader:
        bad += batch["n_bad"]
        if not len(batch["labels"]):
            continue
        y = batch["labels"] if targets is None else targets[batch["labels"]]
        y = y.to(device, non_blocking=True)
        logits = predict(batch).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        conf += torch.bincount(y * n + logits.argmax(1), minlength=n * n).double()
    totals = torch.cat([conf, loss_sum.view(1), torch.tensor([float(bad)], dtype=torch.float64, device=device)])
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    conf = totals[: n * n].view(n, n).cpu()
    examples = int(conf.sum().item())
    out = from_confusion(conf, class_names)
    out.update(loss=totals[n * n].item() / max(examples, 1), examples=examples, skipped=int(totals[-1].item()))
    return out
