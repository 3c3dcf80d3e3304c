"""Class imbalance (issue 24, point 2): does --class-weights auto or --balanced-sampling help the minority class?
Not part of `bench.run`, and not a test: it reports what it measures, whichever way that goes.

The same tiny setup is trained on a 3:1 and a 10:1 two-class training split, each three ways: unweighted,
`--class-weights auto` and `--balanced-sampling`, and on a balanced 1:1 split for reference, for several seeds (the seed sets the data order, the
augmentation and the initial weights; the datasets stay the same). Each run is evaluated on a balanced validation
split (the dataset's own `validation` folder, VAL_PER_CLASS images of each class), so the minority class's F1 is
measured on as many images as the majority's. The classes overlap (a colour tint drawn from two overlapping
distributions, in noise; tests/helpers.py's images are separated in a few steps, where imbalance cannot hurt), so
that the network has to trade one class's errors against the other's.
Reported per run: the minority class's F1 and recall, macro F1 and accuracy after the last epoch (no checkpoint
picked by the validation split), and their mean over the seeds.

    OMP_NUM_THREADS=1 python -m bench.imbalance [--seeds 3] [--results bench/results/imbalance.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("common", "rare")
MAJORITY = 300  # training images of the common class
RATIOS = (1, 3, 10)  # common : rare in the training split (1: the balanced reference)
VAL_PER_CLASS = 100
TINT = 10.0  # mean (and spread) of the colour tint that tells the classes apart
MODES = {"unweighted": {}, "class_weights_auto": {"class_weights": "auto"},
         "balanced_sampling": {"balanced_sampling": True}}
SETTINGS = {"model": "test_resnet", "pretrained": False, "image_size": 32, "epochs": 6, "batch_size": 32,
            "lr": 3e-3, "num_workers": 0, "progress": False, "report_to": "none", "save_every": "epoch",
            "keep_last": 1}


def hard_image(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    """A noisy gray image tinted towards red (rare) or blue (common) by an amount drawn from two overlapping normal
    distributions (means +-TINT, sd TINT): about 84% of a balanced split can be told apart, so where the network puts
    the boundary between the classes decides which class's errors it makes."""
    tint = rng.normal(TINT if label == 1 else -TINT, TINT)
    arr = rng.uniform(90, 160) + np.array([tint, 0.0, -tint]) + rng.normal(0, 30, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def make_dataset(root: Path, rare: int) -> Path:
    """root/train/{common,rare}/ (MAJORITY and `rare` images) and root/validation/ (VAL_PER_CLASS each, the same
    images whatever `rare` is)."""
    for split, counts in (("train", (MAJORITY, rare)), ("validation", (VAL_PER_CLASS, VAL_PER_CLASS))):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for label, n in enumerate(counts):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:04d}.png").write_bytes(hard_image(label, rng))
    return root


def one_run(dataset: Path, out: Path, seed: int, mode: str) -> dict:
    from hubtune.config import TrainConfig
    from hubtune.train import train

    started = time.monotonic()
    result = train(TrainConfig(**SETTINGS, **MODES[mode], dataset=str(dataset), output_dir=str(out), seed=seed))
    last = result.history[-1].to_json()  # metrics.json's row
    return {"seed": seed, "rare_f1": round(last["per_class"]["rare"]["f1"], 4),
            "rare_recall": round(last["per_class"]["rare"]["recall"], 4), "macro_f1": round(last["val_f1"], 4),
            "accuracy": round(last["val_accuracy"], 4), "train_examples_last_epoch": last["train_examples"],
            "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "imbalance.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the imbalance warning of every unweighted run, the trackers' notes
    temp = tempfile.TemporaryDirectory(prefix="hubtune-imbalance-")
    work = Path(temp.name)
    started = time.monotonic()
    summary: dict = {"setup": {**SETTINGS, "majority_train": MAJORITY, "val_per_class": VAL_PER_CLASS,
                               "seeds": args.seeds, "reported": "after the last epoch"}, "ratios": {}}
    for ratio in RATIOS:
        rare = MAJORITY // ratio
        dataset = make_dataset(work / f"data-{ratio}", rare)
        rows = {}
        for mode in MODES if ratio > 1 else ["unweighted"]:  # balanced: the weights and draw rates are all 1
            runs = [one_run(dataset, work / f"run-{ratio}-{mode}-{seed}", seed, mode) for seed in range(args.seeds)]
            means = {key: round(statistics.mean(r[key] for r in runs), 4)
                     for key in ("rare_f1", "rare_recall", "macro_f1", "accuracy")}
            rows[mode] = {"mean": means, "runs": runs}
            print(f"{ratio}:1 {mode:>18}: rare F1 {means['rare_f1']:.3f} (recall {means['rare_recall']:.3f}), "
                  f"macro F1 {means['macro_f1']:.3f}, accuracy {means['accuracy']:.3f} over {args.seeds} seeds",
                  flush=True)
        summary["ratios"][f"{ratio}:1"] = {"train_per_class": {"common": MAJORITY, "rare": rare}, "modes": rows}
    temp.cleanup()
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {args.results} ({summary['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
