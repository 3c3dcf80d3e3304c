"""`hubtune train --calibrate`: fit one softmax temperature to the exported weights on the validation split.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the logits by a single
T > 0 chosen to minimise the validation negative log-likelihood: predictions do not change, confidences do. The
temperature is stored in config.json, where only hubtune reads it (`ImageClassifier`, `hubtune predict`, `hubtune
evaluate`); timm and transformers load the same weights and ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hubtune import data, metrics, stream
from hubtune import model as model_lib
from hubtune.errors import DataError, get_logger
from hubtune.job import val_stream
from hubtune.records import Calibration

logger = get_logger("hubtune")

LOG_T_BOUNDS = (math.log(0.01), math.log(100.0))  # a validation split the model gets all right pulls T towards 0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the mean cross-entropy of `logits / T` (L-BFGS on log T, so T stays positive)."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return math.exp(min(max(log_t.item(), LOG_T_BOUNDS[0]), LOG_T_BOUNDS[1]))


def validation_loader(source: data.DatasetSource, reading: stream.ReadSettings, info: data.DataInfo,
                      data_cfg: dict[str, Any], pin_memory: bool) -> Any:
    """The whole validation split in one process's loader, cut as training cuts it (hubtune.job builds the same
    stream per process, each with its own shard)."""
    _, val_src, _ = data.open_splits(source)
    _, eval_tf = model_lib.transforms(data_cfg)
    ds = val_stream(reading, info, val_src, eval_tf, rank=0, world_size=1)  # all of it, as one process
    return stream.make_loader(ds, reading.batch_size, reading.num_workers, pin_memory)


def calibrate(net: torch.nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor], loader: Any) -> Calibration:
    """Fit the temperature of `net` on every example of `loader`; the metrics.json record of it.

    Args:
        net: the exported weights (evaluated in eval mode, restored to the mode they were in).
        prepare: normalizes a loader batch of uint8 images on the device `net` runs on.
        loader: the validation split, whole (see `validation_loader`).

    Raises:
        DataError: the loader has no decodable image.
    """
    was_training = net.training
    net.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            if len(batch.labels):
                outputs.append(net(prepare(batch.images())).float().cpu())
                targets.append(batch.labels.cpu())
    net.train(was_training)
    if not outputs:
        raise DataError("--calibrate: the validation split has no decodable image to fit the temperature on")
    logits, labels = torch.cat(outputs), torch.cat(targets)
    temperature = fit_temperature(logits, labels)
    before, after = metrics.calibration_bins(logits, labels), metrics.calibration_bins(logits / temperature, labels)
    record = Calibration(
        temperature=temperature, examples=len(labels), n_bins=metrics.N_BINS,
        ece_before=metrics.expected_calibration_error(before),
        ece_after=metrics.expected_calibration_error(after),
        nll_before=F.cross_entropy(logits, labels).item(),
        nll_after=F.cross_entropy(logits / temperature, labels).item(),
        bins_before=metrics.describe_bins(before), bins_after=metrics.describe_bins(after),
    )
    logger.info(f"--calibrate: temperature {temperature:.4f} on {len(labels)} validation images; ECE "
                f"{record.ece_before:.4f} -> {record.ece_after:.4f}, NLL {record.nll_before:.4f} -> "
                f"{record.nll_after:.4f}")
    return record
