"""Bugs a user would not notice: each test fails on a plausible one-line mistake whose effect no other test sees
(class names exported alphabetically, a transposed confusion matrix, a flag that never reaches the optimizer)."""

import json
import random

import datasets
import pytest
import torch
from helpers import _encode, make_rgb

from hubtune import metrics
from hubtune.config import TrainConfig


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions():
    from accelerate import Accelerator

    # three cats (two called cat, one dog), one dog called dog
    from hubtune.stream import Batch

    # (the "images" are the logits: the model is the identity)
    batch = Batch(pixel_values=torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]),
                  labels=torch.tensor([0, 0, 0, 1]), keys=[0, 1, 2, 3], n_bad=0)
    out = metrics.evaluate(lambda b: b.pixel_values, [batch], Accelerator(cpu=True), ["cat", "dog"])
    assert out.confusion_matrix == [[2, 1], [0, 1]]
    assert out.per_class["cat"].to_json() == {"precision": 1.0, "recall": pytest.approx(2 / 3),
                                              "f1": pytest.approx(0.8), "support": 3}
    assert out.per_class["dog"].to_json() == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                              "support": 1}
    assert out.accuracy == 0.75 and out.examples == 4


@pytest.fixture(scope="module")
def dog_first(tmp_path_factory):
    """A parquet dataset whose ClassLabel order is not alphabetical: index 0 is dog."""
    rng = random.Random(3)
    names = ["dog", "cat"]
    items = [(label, _encode(make_rgb(1 - label, rng), "PNG")) for label in (0, 1) for _ in range(24)]
    rng.shuffle(items)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": f"{i}.png"} for i, (_, b) in enumerate(items)],
                                     "label": [lab for lab, _ in items]}, features=features)
    path = tmp_path_factory.mktemp("dog_first") / "train.parquet"
    ds.to_parquet(str(path))
    return path


def test_class_names_are_exported_in_the_classifiers_index_order_not_sorted(dog_first, tmp_path):
    from hubtune.train import train

    out = tmp_path / "run"
    result = train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(dog_first), image_size=32, epochs=1,
                               batch_size=16, num_workers=0, progress=False, output_dir=str(out), report_to="none"))
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["dog", "cat"]
    assert list(result.best.metrics.per_class) == ["dog", "cat"]
    # row 0 of the confusion matrix counts the dogs: as many as the validation split holds
    val_dogs = result.best.metrics.per_class["dog"].support
    assert sum(result.best.metrics.confusion_matrix[0]) == val_dogs


def test_layer_decay_and_ema_decay_reach_the_optimizer_and_the_ema(two_class_folder, tmp_path):
    """--layer-decay scales the early layers' learning rates below the head's; --model-ema-decay is the EMA's decay
    (not 1 - decay)."""
    from hubtune.job import build_job

    cfg = TrainConfig(model="test_resnet", pretrained=False, dataset=str(two_class_folder), image_size=32, epochs=1,
                      batch_size=8, num_workers=0, progress=False, output_dir=str(tmp_path / "run"),
                      report_to="none", layer_decay=0.5, lr=1e-3, model_ema=True, model_ema_decay=0.99,
                      max_bad_fraction=0.05)
    job = build_job(cfg)
    head = {id(p) for p in job.net.get_classifier().parameters()}
    first = next(job.net.parameters())  # the stem's first convolution
    groups = job.optimizer.optimizer.param_groups
    head_lr = [g["lr"] for g in groups if any(id(p) in head for p in g["params"])]
    stem_lr = [g["lr"] for g in groups if any(p is first for p in g["params"])]
    assert head_lr and all(lr == pytest.approx(1e-3) for lr in head_lr)
    assert len(stem_lr) == 1 and stem_lr[0] < 1e-3 * 0.5 ** 2  # several layers below the head
    assert job.ema.decay == 0.99
