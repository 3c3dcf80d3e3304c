"""timm's training recipes under timm's flag names: the same draws as timm's own implementations, exact resume with
every recipe on, two processes, what they refuse, and the record (train_config.yaml, card, reproduce)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_checkpoint import assert_same_run, finish
from test_checkpoint import flags as resume_flags
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from hubtune import recipes, seeding, stream
from hubtune.config import TrainConfig, parse
from hubtune.data import decode

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# every recipe at once; RandAugment at a magnitude that changes a 32 px image, erasing and mixing every batch
RECIPES = ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-switch-prob", "0.3", "--smoothing", "0.1",
           "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--remode", "rand", "--drop-path", "0.1"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def recipe_job(two_class_folder, tmp_path):
    from hubtune.job import build_job

    cfg = TrainConfig(model="test_resnet", pretrained=False, dataset=str(two_class_folder), image_size=32, epochs=1,
                      batch_size=8, num_workers=0, progress=False, output_dir=str(tmp_path / "run"),
                      report_to="none", max_bad_fraction=0.05, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5,
                      smoothing=0.1, reprob=0.5, remode="pixel", recount=2, aa="rand-m9-mstd0.5-inc1")
    return build_job(cfg)


def test_mixed_and_erased_batch_equals_timms_random_erasing_then_mixup_for_the_same_seed(recipe_job):
    """The batch the model trains on is timm's RandomErasing, then timm's Mixup (with the smoothing in its targets),
    of the normalized batch, built from the flags as timm's train.py builds them."""
    job = recipe_job
    batch = next(iter(job.train_loader))
    assert len(batch.labels) == 8
    for seed in range(6):  # mixup and cutmix draws both occur
        seed_all(seed)
        x, targets = job.train_inputs(batch, "0")
        seed_all(seed)
        expected = job.normalize(batch.pixel_values)
        expected = RandomErasing(probability=0.5, mode="pixel", max_count=2, device="cpu")(expected)
        timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                           label_smoothing=0.1, num_classes=2)
        expected, expected_targets = timm_mixup(expected, batch.labels)
        assert torch.equal(x, expected)
        assert torch.equal(targets, expected_targets)
        assert not torch.equal(x, job.normalize(batch.pixel_values))  # something was mixed
        assert targets.dtype.is_floating_point and targets.shape == (8, 2)
        assert torch.allclose(targets.sum(1), torch.ones(8))


def test_an_odd_batch_mixes_its_even_part_as_timm_does_and_keeps_the_last_image_with_its_smoothed_label():
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.2, num_classes=3)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    seed_all(1)
    got, targets = recipes.mix(mixup, x.clone(), y)
    seed_all(1)
    expected, expected_targets = mixup(x[:4].clone(), y[:4])
    assert torch.equal(got[:4], expected) and torch.equal(targets[:4], expected_targets)
    assert torch.equal(got[4], x[4])
    assert torch.allclose(targets[4], torch.tensor([0.2 / 3, 1 - 0.2 + 0.2 / 3, 0.2 / 3]))
    alone, target = recipes.mix(mixup, x[:1].clone(), y[:1])  # a batch of one cannot be mixed
    assert torch.equal(alone, x[:1]) and target.shape == (1, 3)


def test_auto_augmented_training_images_equal_timms_transform_for_the_same_per_example_seed(recipe_job):
    """--aa is timm's create_transform(auto_augment=...) for the model's data config, seeded per example from (seed,
    epoch, image content) as every training image is: it does not depend on workers, processes or resume."""
    job = recipe_job
    timm_tf = create_transform(**job.data_cfg, is_training=True, use_prefetcher=True,
                               auto_augment="rand-m9-mstd0.5-inc1")
    plain_tf = create_transform(**job.data_cfg, is_training=True, use_prefetcher=True)
    assert "RandAugment" in repr(job.train_ds.transform) and "ColorJitter" not in repr(job.train_ds.transform)
    job.train_ds.set_epoch(0)
    raw = {}
    source = job.train_ds.source
    for row in source:
        raw[stream.content_key(row["data"])] = row["data"]
    checked = differs = 0
    for example in job.train_ds:
        if not example["ok"] or checked == 12:
            continue
        img = decode(raw[example["key"]])
        seed = hash((job.cfg.seed, 0, example["key"])) % 2**63
        expected = seeding.seeded(timm_tf, img, seed)
        assert torch.equal(example["pixel_values"], expected)
        differs += not torch.equal(expected, seeding.seeded(plain_tf, img, seed))
        checked += 1
    assert checked == 12 and differs >= 10  # RandAugment changed the images


def test_label_smoothing_and_class_weights_are_timms_losses_and_pytorchs_weighted_mean():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(recipes.TrainingLoss(0.1)(logits, y), LabelSmoothingCrossEntropy(0.1)(logits, y))
    assert torch.equal(recipes.TrainingLoss()(logits, y), F.cross_entropy(logits, y))
    soft = torch.softmax(torch.randn(6, 3), 1)
    assert torch.equal(recipes.TrainingLoss(0.1)(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    w = torch.tensor([1.0, 2.0, 0.5])
    # soft targets that are one-hot give PyTorch's weighted cross-entropy (the weighted mean over the batch)
    one_hot = F.one_hot(y, 3).float()
    assert torch.allclose(recipes.TrainingLoss(0.0, w)(logits, one_hot), F.cross_entropy(logits, y, weight=w))
    assert torch.allclose(recipes.TrainingLoss(0.1, w)(logits, y), F.cross_entropy(logits, y, weight=w,
                                                                                 label_smoothing=0.1))


def test_timms_drop_path_name_sets_the_stochastic_depth_rate_from_flags_and_yaml(two_class_folder, tmp_path):
    from hubtune import model as model_lib

    assert parse(["--drop-path", "0.2"]).drop_path_rate == 0.2
    config = tmp_path / "c.yaml"
    config.write_text("drop_path: 0.3\nmixup: 0.2\n")
    cfg = parse(["--config", str(config)])
    assert (cfg.drop_path_rate, cfg.mixup) == (0.3, 0.2)
    net = model_lib.create("test_resnet", num_classes=2, pretrained=False, drop_path_rate=cfg.drop_path_rate)
    assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in net.modules())


@pytest.mark.parametrize(("extra", "message"), [
    (["--aa", "rand-m9", "--decode-device", "cuda"],
     "--aa 'rand-m9' cannot run with --decode-device cuda: the device path replays only timm's crop, flip and color "
     "jitter; use --decode-device cpu"),
    (["--cache-features", "--freeze", "stem,stages", "--freeze-bn", "--mixup", "0.2", "--reprob", "0.25"],
     "--cache-features cannot be combined with --mixup, --reprob: cached features are computed from whole, unmixed "
     "and unerased images, each once per view"),
    (["--aa", "bogus-m9"], "--aa: got 'bogus-m9', expected a timm auto-augment policy"),
    (["--aa", "rand-m9-zz3"], "--aa 'rand-m9-zz3' is not a policy timm accepts"),
    (["--mixup", "0.2", "--batch-size", "1"], "--batch-size: got 1, expected 2 or more with --mixup/--cutmix"),
    (["--mixup-mode", "pairs"], "--mixup-mode: got 'pairs', expected one of batch, pair, elem; did you mean pair?"),
])
@pytest.mark.slow
def test_recipes_refuse_what_they_cannot_do_in_one_line(extra, message, two_class_folder, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "train", "--model", "test_resnet", "--no-pretrained",
                           "--dataset", str(two_class_folder), "--image-size", "32", "--output-dir", str(out),
                           "--max-bad-fraction", "0.05", "--report-to", "none", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def recipe_reference(two_class_folder, tmp_path_factory):
    """An uninterrupted run with every recipe on (plus the whole state test_checkpoint's runs carry: EMA, gradual
    unfreezing, dropout, one loader worker)."""
    out = tmp_path_factory.mktemp("recipe_reference")
    proc = finish(resume_flags(two_class_folder, out, "--num-workers", "1", *RECIPES))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_a_run_with_every_recipe_killed_mid_epoch_resumes_bitwise_equal(two_class_folder, tmp_path,
                                                                       recipe_reference):
    """SIGKILL to `accelerate launch hubtune/train.py`'s whole process group (a lost machine) after a mid-epoch
    checkpoint; `--resume latest` then ends with the uninterrupted run's weights, EMA, history and curves: the mixup
    draws, erasing boxes and RandAugment ops after the checkpoint are the ones the uninterrupted run drew."""
    args = resume_flags(two_class_folder, tmp_path, "--num-workers", "1", *RECIPES)
    launch = [ACCELERATE, "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "hubtune/train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(launch + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen, saved = [], False
    for line in proc.stderr:
        seen.append(line)
        saved = saved or "saved checkpoint step-000004" in line
        if saved and "step 6 |" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.stderr.read()
    assert proc.wait(timeout=120) == -signal.SIGKILL, "".join(seen)[-3000:]
    done = subprocess.run(launch + args + ["--resume", "latest"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step-000004" in done.stderr
    assert_same_run(tmp_path, recipe_reference)


@pytest.mark.slow
def test_two_processes_train_with_every_recipe_and_the_card_and_reproduce_carry_them(two_class_folder, tmp_path):
    from hubtune.reproduce import fetch_record, plan

    out = tmp_path / "ddp"
    cmd = [ACCELERATE, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "hubtune/train.py", "--model", "test_resnet",
           "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32", "--epochs", "1",
           "--batch-size", "8", "--num-workers", "0", "--max-bad-fraction", "0.05", "--output-dir", str(out),
           "--no-progress", "--report-to", "none", *RECIPES]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and np.isfinite(metrics["history"][0]["train_loss"])
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    wanted = {"mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.3, "smoothing": 0.1, "aa": "rand-m9-mstd0.5-inc1",
              "reprob": 0.5, "remode": "rand", "drop_path_rate": 0.1}
    assert {k: recorded[k] for k in wanted} == wanted
    card = (out / "README.md").read_text()
    for name, value in wanted.items():
        assert f"| **`--{name.replace('_', '-')}`** | **`{value}`** |" in card, name
    config, metrics, _ = fetch_record(str(out))
    cfg, _, _ = plan(config, metrics, str(tmp_path / "again"))
    assert {k: getattr(cfg, k) for k in wanted} == wanted


def test_a_training_batch_of_one_image_is_passed_over_instead_of_failing_in_batchnorm(tmp_path):
    """9 training images in batches of 8: the last batch holds one image, on which BatchNorm cannot train (timm's
    loaders drop their last batch); the run trains on the 8 and goes on, with and without mixup."""
    import random as stdlib_random

    from helpers import _encode, make_rgb

    from hubtune.train import train

    rng = stdlib_random.Random(0)
    for split, counts in (("train", (5, 4)), ("validation", (3, 3))):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(counts[label]):
                (folder / f"{i}.png").write_bytes(_encode(make_rgb(label, rng), "PNG"))
    for extra in ({}, {"mixup": 0.2}):
        out = tmp_path / f"run{len(extra)}"
        result = train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(tmp_path / "data"), image_size=32,
                                   epochs=2, batch_size=8, num_workers=0, progress=False, output_dir=str(out),
                                   report_to="none", **extra))
        assert [row.train_examples for row in result.history] == [8, 8]
        assert result.metrics.global_step == 2
