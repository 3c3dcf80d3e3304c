"""Class imbalance: the training split's counts, --class-weights, --balanced-sampling and the warning, on a 3:1
dataset; exact resume after SIGKILL and two processes with the flags on."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import CLASSES, _encode, make_rgb
from safetensors.torch import load_file
from torchdata.stateful_dataloader import StatefulDataLoader

from hubtune import checkpoint, data, stream
from hubtune.config import TrainConfig
from hubtune.errors import ConfigError, DataError
from hubtune.job import build_job, dataset_source
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = (60, 20)  # cat:dog, 3:1


def imbalanced_items(per_class: tuple[int, ...] = PER_CLASS, seed: int = 0) -> list[tuple[str, bytes, int]]:
    rng = random.Random(seed)
    items = [(f"{CLASSES[label]}_{i:04d}.{'png' if i % 2 else 'jpeg'}",
              _encode(make_rgb(label, rng), "PNG" if i % 2 else "JPEG"), label)
             for label, n in enumerate(per_class) for i in range(n)]
    rng.shuffle(items)
    return items


def training_counts(items: list[tuple[str, bytes, int]], val_fraction: float = 0.1) -> list[int]:
    """By hand: the examples the content hash leaves in the training split, per class."""
    counts = [0] * len(CLASSES)
    for _, payload, label in items:
        counts[label] += not stream.in_val(stream.content_key(payload), val_fraction)
    return counts


@pytest.fixture(scope="module")
def three_to_one(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    for name, payload, label in imbalanced_items():
        (root / CLASSES[label]).mkdir(exist_ok=True)
        (root / CLASSES[label] / name).write_bytes(payload)
    return root


def config(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="test_resnet", pretrained=False, dataset=str(dataset), image_size=32, epochs=1, batch_size=8,
                num_workers=0, progress=False, output_dir=str(out), report_to="none")
    return TrainConfig(**{**base, **kw})


WARNING = "imbalanced training split: class 'cat' has"


@pytest.mark.parametrize("weights, balanced", [("none", False), ("auto", False), ("dog=3", False), ("none", True)])
def test_counts_weights_and_draw_rates_follow_the_training_split_and_only_an_uncorrected_run_is_warned(
        weights, balanced, three_to_one, tmp_path, caplog):
    cat, dog = training_counts(imbalanced_items())
    n = cat + dog
    with caplog.at_level(logging.WARNING, logger="hubtune"):
        job = build_job(config(three_to_one, tmp_path, class_weights=weights, balanced_sampling=balanced))
    record = job.run_info["class_balance"]
    assert record["train_counts"] == {"cat": cat, "dog": dog} and record["complete"]
    expected = {"none": None, "auto": [n / (2 * cat), n / (2 * dog)], "dog=3": [1.0, 3.0]}[weights]
    if expected is None:
        assert job.loss.class_weights is None and record["class_weights"] is None
    else:  # the weights reach the loss: PyTorch's weighted cross-entropy
        assert torch.equal(job.loss.class_weights, torch.tensor(expected, dtype=torch.float32))
        logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 0, 0])
        assert torch.allclose(job.loss(logits, y), F.cross_entropy(logits, y, weight=torch.tensor(expected)))
    assert job.train_ds.draw_rates == ((n / (2 * cat), n / (2 * dog)) if balanced else None)
    assert job.val_ds.draw_rates is None  # validation is never resampled
    warned = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    if weights == "none" and not balanced:
        assert len(warned) == 1 and f"'cat' has {cat} examples, 'dog' {dog}" in warned[0]
        assert "--class-weights auto" in warned[0] and "--balanced-sampling" in warned[0]
    else:
        assert warned == []


def test_without_either_flag_only_a_bounded_sample_is_counted_and_the_warning_says_so(three_to_one, tmp_path,
                                                                                      caplog, monkeypatch):
    from hubtune import balance

    monkeypatch.setattr(balance, "SAMPLE_EXAMPLES", 20)
    with caplog.at_level(logging.WARNING, logger="hubtune"):
        job = build_job(config(three_to_one, tmp_path, class_weights="cat=1"))
    record = job.run_info["class_balance"]
    assert sum(record["train_counts"].values()) == 20 and not record["complete"] and record["sample_limit"] == 20
    assert WARNING not in caplog.text  # a flag is set: nothing to warn about
    job = build_job(config(three_to_one, tmp_path / "plain"))
    assert "imbalanced training split in the first 20 training examples of each process (a sample" in caplog.text


def test_a_weight_for_a_class_the_dataset_lacks_is_a_one_line_error_naming_it_and_the_classes(three_to_one, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(config(three_to_one, tmp_path, class_weights="cat=1,dgo=3"))
    message = str(err.value)
    assert message == "--class-weights: 'dgo' is not a class of the dataset; did you mean dog?; classes: cat, dog"
    assert not (tmp_path / "train_config.yaml").exists()  # refused before anything was written


def test_auto_weights_refuse_a_class_without_training_examples(tmp_path):
    items = imbalanced_items((12, 4))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[*CLASSES, "bird"])})
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": n} for n, b, _ in items],
                                "label": [label for *_, label in items]}, features=features).to_parquet(str(path))
    with pytest.raises(DataError, match=r"^--class-weights auto: class 'bird' has no training example .*counts: "
                                        r"cat \d+, dog \d+, bird 0\); add images of it"):
        train(config(path, tmp_path / "run", class_weights="auto"))


def balanced_loader(dataset: Path, workers: int, rates: tuple[float, ...] | None) -> StatefulDataLoader:
    """The training stream with draw rates, whose 'pixels' are random draws from the example's augmentation seed."""
    train_src, _, info = data.open_splits(dataset_source(TrainConfig(dataset=str(dataset))))
    source = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=3)
    ds = stream.ExampleStream(source, lambda img: torch.randint(0, 2**31, ()), keep_val=False, val_fraction=0.1,
                              seed=3, shuffle_buffer=16)
    ds.draw_rates = rates
    return stream.make_loader(ds, batch_size=8, num_workers=workers, pin_memory=False)


def draws(loader) -> list[tuple[int, int, int]]:
    return [(k, y, v) for b in loader for k, y, v in zip(b.keys, b.labels.tolist(), b.pixel_values.tolist())]


def test_balanced_sampling_draws_classes_about_equally_the_same_with_zero_or_one_worker(three_to_one):
    cat, dog = training_counts(imbalanced_items())
    rates = ((cat + dog) / (2 * cat), (cat + dog) / (2 * dog))
    loaders = {workers: balanced_loader(three_to_one, workers, rates) for workers in (0, 1)}
    epochs = []
    for epoch in range(3):
        for loader in loaders.values():
            loader.dataset.set_epoch(epoch)
        got = draws(loaders[0])
        assert got == draws(loaders[1]), f"epoch {epoch}"
        epochs.append(got)
    assert len({tuple(e) for e in epochs}) == 3  # each epoch draws anew
    labels = Counter(y for epoch in epochs for _, y, _ in epoch)
    assert max(labels.values()) / min(labels.values()) < 1.4, labels  # the split itself is about 3:1
    assert 0.8 < sum(labels.values()) / (3 * (cat + dog)) < 1.2  # an epoch stays about as long
    for epoch in epochs:  # a repeated image is augmented differently each time it is drawn
        by_key: dict[int, set[int]] = {}
        for key, _, value in epoch:
            by_key.setdefault(key, set()).add(value)
        repeated = [key for key, n in Counter(k for k, _, _ in epoch).items() if n > 1]
        assert repeated and all(len(by_key[key]) == Counter(k for k, _, _ in epoch)[key] for key in repeated)
    unbalanced = draws(balanced_loader(three_to_one, 0, None))
    assert Counter(y for _, y, _ in unbalanced) == {0: cat, 1: dog}


def test_a_position_between_two_copies_of_an_image_resumes_exactly(three_to_one):
    cat, dog = training_counts(imbalanced_items())
    ds = balanced_loader(three_to_one, 0, ((cat + dog) / (2 * cat), (cat + dog) / (2 * dog))).dataset
    ds.set_epoch(1)
    seen, states = [], []
    for example in ds:
        seen.append((example["key"], example["pixel_values"].item()))
        states.append(ds.state_dict())
    keys = [k for k, _ in seen]
    # the last position of a block is where the next one starts: states[i]["block"] is the block of draw i
    between = [j for j in range(len(seen) - 1)
               if any(keys[i] == keys[j] and states[i]["block"] == states[j]["block"] for i in range(j + 1, len(seen)))]
    assert len(between) >= 3, "too few images repeated within a block"
    between = between[:: max(1, len(between) // 4)]
    for j in between:  # checkpointed after one copy was drawn and before another
        restored = balanced_loader(three_to_one, 0, ds.draw_rates).dataset
        restored.load_state_dict(states[j])
        assert [(e["key"], e["pixel_values"].item()) for e in restored] == seen[j + 1:]


def cli_flags(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "test_resnet", "--no-pretrained", "--dataset", str(dataset), "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--output-dir", str(out),
            "--save-every", "3", "--log-every", "1", "--shuffle-buffer", "32", "--drop-rate", "0.3",
            "--report-to", "none", "--balanced-sampling", "--class-weights", "dog=2", *extra]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_sigkill_mid_epoch_with_balanced_sampling_then_resume_equals_the_uninterrupted_run(three_to_one, tmp_path):
    hubtune = [sys.executable, "-m", "hubtune.cli", "train"]
    reference = run([*hubtune, *cli_flags(three_to_one, tmp_path / "reference", "--num-workers", "1")])
    assert reference.returncode == 0, reference.stderr[-2000:]
    args = [*hubtune, *cli_flags(three_to_one, tmp_path / "run", "--num-workers", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    saved = False
    for line in proc.stderr:
        saved = saved or "saved checkpoint step-000003" in line
        if saved and "step 5 |" in line:  # mid-epoch, after a checkpoint taken mid-epoch
            proc.kill()
            break
    proc.stderr.read()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    done = run([*args, "--resume", "latest"])
    assert done.returncode == 0 and "resumed from" in done.stderr, done.stderr[-2000:]
    ref = load_file(str(checkpoint.listing(tmp_path / "reference")[-1] / checkpoint.MODEL_FILE))
    got = load_file(str(checkpoint.listing(tmp_path / "run")[-1] / checkpoint.MODEL_FILE))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("reference", "run")]
    assert metrics[0]["history"] == metrics[1]["history"]
    balance = metrics[1]["run_info"]["class_balance"]
    assert balance["class_weights"] == {"cat": 1.0, "dog": 2.0} and set(balance["draw_rates"]) == {"cat", "dog"}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- **Training images per class:** `cat` " in card and "- **Balanced sampling:**" in card


@pytest.mark.slow
def test_two_processes_with_both_flags_count_over_both_shards(three_to_one, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(three_to_one), "--image-size", "32",
             "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--output-dir", str(out), "--no-progress",
             "--report-to", "none", "--class-weights", "auto", "--balanced-sampling"]
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "hubtune/train.py", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    cat, dog = training_counts(imbalanced_items())
    balance = metrics["run_info"]["class_balance"]
    assert balance["train_counts"] == {"cat": cat, "dog": dog} and balance["complete"]
    n = cat + dog
    assert balance["class_weights"] == pytest.approx({"cat": n / (2 * cat), "dog": n / (2 * dog)})
    assert "together they reverse it" in proc.stderr  # both flags: warned once, by the main process
    assert proc.stderr.count("together they reverse it") == 1
