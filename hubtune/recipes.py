"""timm's training recipes on hubtune's batches: random erasing and mixup/cutmix on the normalized batch, and the
training loss (label smoothing, soft mixed targets, class weights).

The random draws come from the main process's global streams (python `random` for erasing, numpy for mixup, torch
for the noise and cutmix boxes), which every checkpoint saves per process: a resumed run draws what the
uninterrupted one drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


@dataclass(frozen=True)
class MixRecipe:
    """--mixup and --cutmix alphas (0: off), --mixup-prob, --mixup-switch-prob, --mixup-mode, and --smoothing, which
    timm's Mixup puts into its soft targets."""

    mixup: float
    cutmix: float
    prob: float
    switch_prob: float
    mode: str
    smoothing: float


@dataclass(frozen=True)
class EraseRecipe:
    """--reprob (0: off), --remode, --recount: timm's random erasing."""

    prob: float
    mode: str
    max_count: int


def make_mixup(recipe: MixRecipe | None, num_classes: int) -> Mixup | None:
    """timm's Mixup for --mixup/--cutmix (None when both are off); --smoothing goes into its targets, as in timm."""
    if recipe is None:
        return None
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.prob,
                 switch_prob=recipe.switch_prob, mode=recipe.mode, label_smoothing=recipe.smoothing,
                 num_classes=num_classes)


def make_eraser(recipe: EraseRecipe, device: torch.device) -> RandomErasing | None:
    """timm's RandomErasing for --reprob, on normalized batches on `device` (timm's PrefetchLoader does the same)."""
    if not recipe.prob:
        return None
    return RandomErasing(probability=recipe.prob, mode=recipe.mode, max_count=recipe.max_count, device=str(device))


def mix(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, soft targets) of one normalized batch: timm's Mixup output for an even batch.

    timm's Mixup takes even batches only (its train.py drops the last, odd one). A stream's batches can be odd (the
    last of an epoch, undecodable images dropped): then the last image stays as it is, with the smoothed target of
    its own label, and the others are mixed as timm mixes an even batch.
    """
    even = len(x) - len(x) % 2
    if even == len(x):
        return mixup(x, y)
    if even == 0:
        return x, mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)
    head, targets = mixup(x[:even], y[:even])  # mixes the view in place
    last = mixup_target(y[even:], mixup.num_classes, 1.0, mixup.label_smoothing)
    return torch.cat([head, x[even:]]), torch.cat([targets, last])


class TrainingLoss:
    """The training loss: cross-entropy, with timm's label smoothing, soft (mixed) targets and class weights.

    Without class weights it is timm's own: SoftTargetCrossEntropy for mixed targets, LabelSmoothingCrossEntropy for
    --smoothing. A class's weight scales the loss of its examples (of a mixed target, in proportion), normalized by the
    batch's total weight: PyTorch's weighted cross-entropy, extended to soft targets.
    """

    def __init__(self, smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> None:
        self.smoothing = smoothing
        self.class_weights = class_weights
        self._soft = SoftTargetCrossEntropy()
        self._smoothed = LabelSmoothingCrossEntropy(smoothing) if smoothing else None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        if target.dtype.is_floating_point:  # mixed soft targets (smoothing included)
            if weights is None:
                return self._soft(logits, target)
            weighted = target * weights
            return -(weighted * F.log_softmax(logits, dim=-1)).sum() / weighted.sum()
        if weights is not None:
            return F.cross_entropy(logits, target, weight=weights, label_smoothing=self.smoothing)
        if self._smoothed is not None:
            return self._smoothed(logits, target)
        return F.cross_entropy(logits, target)
