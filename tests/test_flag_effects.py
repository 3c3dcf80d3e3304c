"""Flags a user would not see misapplied: each is recorded in train_config.yaml and the card, so a flag that never
reached the model, optimizer, schedule, data or loop would go unnoticed. Each test observes the flag's effect where it
lands, and fails on the plausible silent mistake named in its docstring (issue 23, point 6).

Most build the job without training it (test_resnet at 32 px); the loop's flags share two tiny training runs.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import _encode, make_rgb
from PIL import Image
from timm.layers import DropPath
from timm.loss import LabelSmoothingCrossEntropy

from hubtune.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def flags(dataset: Path, out: Path, **overrides) -> TrainConfig:
    """The tests' usual small run (test_resnet, 32 px, no workers), with `overrides`."""
    base = {"model": "test_resnet", "pretrained": False, "dataset": str(dataset), "image_size": 32, "epochs": 1,
            "batch_size": 8, "num_workers": 0, "progress": False, "output_dir": str(out), "report_to": "none",
            "max_bad_fraction": 0.05}
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def job_with(two_class_folder, tmp_path):
    """build_job of the usual small run with the given flags (each call its own output directory)."""
    from hubtune.job import build_job

    count = iter(range(100))

    def build(**overrides):
        return build_job(flags(two_class_folder, tmp_path / f"run{next(count)}", **overrides))

    return build


def groups_of(job) -> list[dict]:
    return job.optimizer.optimizer.param_groups


def group_holding(job, param: torch.Tensor) -> dict:
    found = [g for g in groups_of(job) if any(p is param for p in g["params"])]
    assert len(found) == 1, f"the parameter is in {len(found)} optimizer groups"
    return found[0]


# --- model -----------------------------------------------------------------------------------------------------------

def test_drop_rate_and_drop_path_rate_reach_the_model(job_with):
    """--drop-rate is the classifier's dropout and --drop-path the deepest block's stochastic depth (a key typo in the
    regularization dict, or the two swapped, builds a model without them or with the other's rate)."""
    from hubtune import model as model_lib

    job = job_with(drop_rate=0.3, drop_path_rate=0.1)
    assert model_lib.as_timm(job.net).drop_rate == 0.3
    rates = [m.drop_prob for m in job.net.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1)  # timm ramps it up to the flag's value in the last block
    plain = job_with()
    assert model_lib.as_timm(plain.net).drop_rate == 0.0
    assert not [m for m in plain.net.modules() if isinstance(m, DropPath) and m.drop_prob > 0]


# --- optimizer -------------------------------------------------------------------------------------------------------

def test_weight_decay_reaches_the_weights_but_not_biases_and_norms(job_with):
    """--weight-decay is the decay of the weight matrices; biases and BatchNorm parameters get none (a flag not passed
    leaves timm's default, one applied to every parameter decays the biases too)."""
    job = job_with(weight_decay=0.123)
    assert {g["weight_decay"] for g in groups_of(job)} == {0.0, 0.123}
    assert group_holding(job, job.net.fc.weight)["weight_decay"] == 0.123
    assert group_holding(job, job.net.fc.bias)["weight_decay"] == 0.0
    assert group_holding(job, job.net.bn1.weight)["weight_decay"] == 0.0


@pytest.mark.parametrize(("name", "expected"), [("sgd", "SGD"), ("lion", "Lion")])
def test_optimizer_flag_picks_timms_optimizer(job_with, name, expected):
    """--optimizer builds that optimizer (not always adamw); timm's sgd is Nesterov momentum."""
    job = job_with(optimizer=name, lr=0.01)
    assert type(job.optimizer.optimizer).__name__ == expected
    if name == "sgd":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in groups_of(job))
    assert {g["lr"] for g in groups_of(job)} == {0.01}


# --- learning-rate schedule ------------------------------------------------------------------------------------------

def lrs(job) -> set[float]:
    return {round(g["lr"], 6) for g in groups_of(job)}


def test_warmup_steps_ramp_the_lr_up_linearly_over_optimizer_steps(job_with):
    """--warmup-steps counts optimizer steps from 0 to the peak, then the cosine follows (ignored, the lr starts at its
    peak; counted in epochs, it stays at 0 for the whole first epoch)."""
    job = job_with(lr=1.0, warmup_steps=10, max_steps=100)
    assert lrs(job) == {0.0}
    job.scheduler.step_update(num_updates=5)
    assert lrs(job) == {0.5}
    job.scheduler.step_update(num_updates=10)
    assert lrs(job) == {round(0.5 * (1 + math.cos(math.pi * 10 / 100)), 6)}  # 0.975528
    job.scheduler.step_update(num_updates=100)
    assert lrs(job) == {0.0}


def test_max_steps_sets_the_cosine_length(job_with):
    """The cosine decays to 0 at --max-steps (ignored, an imagefolder without a size hint holds the peak lr)."""
    job = job_with(lr=1.0, max_steps=20)
    assert lrs(job) == {1.0}
    job.scheduler.step_update(num_updates=10)
    assert lrs(job) == {0.5}
    job.scheduler.step_update(num_updates=20)
    assert lrs(job) == {0.0}


@pytest.mark.parametrize(("max_steps", "half", "end"), [(None, 20, 40), (8, 4, 8)])
def test_epochs_set_the_cosine_length_unless_max_steps_is_given(two_class_folder, tmp_path, max_steps, half, end):
    """Without --max-steps the cosine spans --epochs x the steps of an epoch; --max-steps overrides it (either flag
    ignored, or the two confused, moves the half-way point)."""
    from hubtune import job as job_lib
    from hubtune.run_state import RunState
    from hubtune.schedule import make_scheduler

    cfg = flags(two_class_folder, tmp_path, epochs=4, max_steps=max_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(opt, job_lib.step_plan(cfg), RunState(steps_per_epoch=10))
    scheduler.step_update(num_updates=half)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    scheduler.step_update(num_updates=end)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_unfreeze_lr_scale_scales_the_lr_of_parts_that_start_to_train(job_with):
    """Parts --unfreeze-at starts to train join the optimizer at --unfreeze-lr-scale times the lr (ignored: 1e-3,
    inverted: 1e-2); the head keeps the full lr. Applied as the loop applies it, at the start of epoch 2."""
    from hubtune.train import begin_epoch

    job = job_with(freeze="stem,stages", unfreeze_at="stages.3=2", unfreeze_lr_scale=0.1, lr=1e-3, epochs=3)
    layer4 = [p for n, p in job.net.named_parameters() if n.startswith("layer4.")]
    held = {id(p) for g in groups_of(job) for p in g["params"]}
    assert layer4 and not any(id(p) in held for p in layer4)  # frozen in epoch 1
    job.state.epoch = 1
    begin_epoch(job)
    job.scheduler.step_update(num_updates=1)  # the first step of epoch 2: the schedule is still at its peak
    assert all(p.requires_grad for p in layer4)
    assert {round(group_holding(job, p)["lr"], 9) for p in layer4} == {1e-4}
    assert {round(group_holding(job, p)["lr"], 9) for p in job.net.fc.parameters()} == {1e-3}


# --- EMA -------------------------------------------------------------------------------------------------------------

def test_model_ema_warmup_ramps_the_ema_decay_up(job_with):
    """--model-ema-warmup makes the EMA's decay start low and ramp up to --model-ema-decay (not passed: the full
    decay from the first step)."""
    job = job_with(model_ema=True, model_ema_decay=0.99, model_ema_warmup=True)
    assert job.ema.use_warmup
    assert job.ema.get_decay(10) < 0.9
    assert job.ema.get_decay(10**6) == pytest.approx(0.99)
    plain = job_with(model_ema=True, model_ema_decay=0.99)
    assert not plain.ema.use_warmup
    assert plain.ema.get_decay(10) == 0.99


# --- training recipes ------------------------------------------------------------------------------------------------

def test_smoothing_without_mixup_is_timms_label_smoothing_loss(job_with):
    """--smoothing alone (no mixing) smooths the training loss as timm's LabelSmoothingCrossEntropy (dropped, it
    is plain cross-entropy)."""
    job = job_with(smoothing=0.1)
    assert job.mixup is None
    torch.manual_seed(0)
    logits, y = torch.randn(6, 2) * 3, torch.tensor([0, 1, 1, 0, 1, 0])
    loss = job.loss(logits, y)
    assert torch.allclose(loss, LabelSmoothingCrossEntropy(0.1)(logits, y))
    assert not torch.allclose(loss, F.cross_entropy(logits, y))
    assert torch.allclose(job_with().loss(logits, y), F.cross_entropy(logits, y))


def test_mixup_prob_switch_prob_and_mode_reach_timms_mixup(job_with):
    """--mixup-prob, --mixup-switch-prob and --mixup-mode are timm Mixup's prob, switch_prob and mode (not its
    defaults 1.0, 0.5, batch)."""
    job = job_with(mixup=0.8, cutmix=1.0, mixup_prob=0.6, mixup_switch_prob=0.3, mixup_mode="elem")
    mixup = job.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha) == (0.8, 1.0)
    assert (mixup.mix_prob, mixup.switch_prob, mixup.mode) == (0.6, 0.3, "elem")


def test_reprob_remode_and_recount_reach_timms_random_erasing(job_with):
    """--reprob is the erasing probability (not 1 - reprob), --remode its fill, --recount its most regions."""
    job = job_with(reprob=0.25, remode="const", recount=3)
    eraser = job.eraser
    assert eraser.probability == 0.25
    assert eraser.mode == "const" and not eraser.per_pixel and not eraser.rand_color
    assert eraser.max_count == 3
    assert job_with().eraser is None  # --reprob 0: no erasing at all


# --- seed and data ---------------------------------------------------------------------------------------------------

def test_seed_flag_seeds_the_model_init_and_the_training_stream(job_with):
    """--seed decides the initial weights and the training stream's shuffling (a constant seed gives every run the same
    weights; a stream seeded apart from the flag shuffles alike whatever the flag)."""
    first, second, again = (job_with(seed=s) for s in (1, 2, 1))
    assert not torch.equal(first.net.fc.weight, second.net.fc.weight)
    assert torch.equal(first.net.fc.weight, again.net.fc.weight)
    assert (first.train_ds.seed, second.train_ds.seed) == (1, 2)
    assert first.val_ds.seed is None  # validation is read in order


def test_shuffle_buffer_is_the_training_streams_shuffle_block(job_with):
    """--shuffle-buffer is the training stream's block (ignored: the default 1000); validation does not shuffle."""
    job = job_with(shuffle_buffer=16)
    assert job.train_ds.block == 16
    assert job.val_ds.seed is None


@pytest.mark.parametrize("persistent", [False, True])
def test_num_workers_and_persistent_workers_reach_the_loaders(job_with, persistent):
    """--num-workers and --persistent-workers are the loaders' (workers start only when a loader is iterated)."""
    job = job_with(num_workers=1, persistent_workers=persistent)
    for loader in (job.train_loader, job.val_loader):
        assert loader.num_workers == 1
        assert loader.persistent_workers is persistent


def test_jpeg_draft_applies_to_validation_at_the_eval_resize(job_with):
    """--jpeg-draft decodes validation JPEGs at the eval transform's resize size, never training ones (whose random
    crop needs the full image)."""
    from hubtune import model as model_lib

    job = job_with(jpeg_draft=True)
    size = model_lib.resize_size(job.val_ds.transform)
    assert size is not None and size >= 32
    assert job.val_ds.draft == size
    assert job.train_ds.draft is None
    assert job_with().val_ds.draft is None


@pytest.mark.parametrize("on", [True, False])
def test_channels_last_converts_the_model_and_the_batches(job_with, on):
    """--channels-last puts the model's weights and the normalized batches in channels_last (dropped from either, the
    convolutions convert on every step); --no-channels-last leaves both contiguous."""
    job = job_with(channels_last=on)
    weight = job.net.conv1[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is on
    x = job.normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last) is on
    assert job.cfg.channels_last is on


def test_augment_off_trains_on_the_eval_transform(job_with):
    """--no-augment: the training stream's transform is the eval transform (ignored: random crops and flips)."""
    off = job_with(augment=False)
    assert off.train_ds.transform is off.val_ds.transform
    on = job_with()
    assert on.train_ds.transform is not on.val_ds.transform


@pytest.fixture(scope="module")
def two_image_two_label_columns(tmp_path_factory) -> Path:
    """A parquet file with two Image columns (a: distinct near-black images, b: the usual coloured ones) and two
    ClassLabel columns (coarse: 2 names, fine: 3), so a named column passed over for the first of its type shows."""
    rng = random.Random(5)
    rows = 30
    fine = [i % 3 for i in range(rows)]
    features = datasets.Features({"a": datasets.Image(), "b": datasets.Image(),
                                  "coarse": datasets.ClassLabel(names=["x", "y"]),
                                  "fine": datasets.ClassLabel(names=["f0", "f1", "f2"])})
    ds = datasets.Dataset.from_dict(
        {"a": [{"bytes": _encode(Image.new("RGB", (40, 40), (i, i, i)), "PNG"), "path": f"a{i}.png"} for i in range(rows)],
         "b": [{"bytes": _encode(make_rgb(label % 2, rng), "PNG"), "path": f"b{i}.png"} for i, label in enumerate(fine)],
         "coarse": [i % 2 for i in range(rows)], "fine": fine}, features=features)
    path = tmp_path_factory.mktemp("columns") / "train.parquet"
    ds.to_parquet(str(path))
    return path


def test_image_and_label_column_flags_pick_the_named_columns(two_image_two_label_columns, tmp_path):
    """--image-column and --label-column pick the named columns even when another column of the same type comes first
    (ignored: the first Image and ClassLabel columns, a and coarse)."""
    from hubtune.job import build_job

    job = build_job(flags(two_image_two_label_columns, tmp_path / "run", image_column="b", label_column="fine",
                          val_fraction=0.3))
    assert (job.info.image_column, job.info.label_column) == ("b", "fine")
    assert job.info.class_names == ["f0", "f1", "f2"]
    assert len(job.net.fc.bias) == 3
    batch = next(iter(job.train_loader))
    assert set(batch.labels.tolist()) <= {0, 1, 2} and 2 in batch.labels.tolist()
    assert batch.pixel_values.float().mean() > 30  # b's images, not a's near-black ones


# --- the training loop: two tiny runs, with and without the loop's flags ----------------------------------------------

class LoopSpy:
    """What the loop hands Accelerate: each clip_grad_norm_'s max_norm, each backward's loss, each training loss (all
    called through)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from accelerate import Accelerator

        from hubtune import recipes

        self.max_norms: list[float] = []
        self.backward: list[float] = []
        self.losses: list[float] = []
        clip, backward, loss = Accelerator.clip_grad_norm_, Accelerator.backward, recipes.TrainingLoss.__call__

        def clip_spy(accelerator, parameters, max_norm, *args, **kwargs):
            self.max_norms.append(max_norm)
            return clip(accelerator, parameters, max_norm, *args, **kwargs)

        def backward_spy(accelerator, value, **kwargs):
            self.backward.append(value.item())
            return backward(accelerator, value, **kwargs)

        def loss_spy(training_loss, logits, target):
            out = loss(training_loss, logits, target)
            self.losses.append(out.item())
            return out

        mp.setattr(Accelerator, "clip_grad_norm_", clip_spy)
        mp.setattr(Accelerator, "backward", backward_spy)
        mp.setattr(recipes.TrainingLoss, "__call__", loss_spy)


def loop_run(dataset: Path, out: Path, **overrides) -> tuple[LoopSpy, list[str]]:
    """2 optimizer steps, a checkpoint after each; (the spy, the checkpoints left)."""
    from hubtune import checkpoint
    from hubtune.train import train

    with pytest.MonkeyPatch.context() as mp:
        spy = LoopSpy(mp)
        train(flags(dataset, out, max_steps=2, save_every="1", **overrides))
    return spy, [p.name for p in checkpoint.listing(out)]


@pytest.fixture(scope="module")
def flagged_loop(two_class_folder, tmp_path_factory):
    return loop_run(two_class_folder, tmp_path_factory.mktemp("flagged") / "run", clip_grad=0.5, grad_accum=2,
                    keep_last=1)


@pytest.fixture(scope="module")
def plain_loop(two_class_folder, tmp_path_factory):
    return loop_run(two_class_folder, tmp_path_factory.mktemp("plain") / "run")


@pytest.mark.slow
def test_clip_grad_clips_every_optimizer_step_at_the_flags_norm(flagged_loop, plain_loop):
    """--clip-grad reaches accelerator.clip_grad_norm_ once per optimizer step (not per micro-batch), with its value;
    without the flag nothing is clipped."""
    spy, _ = flagged_loop
    assert spy.max_norms == [0.5, 0.5]
    assert plain_loop[0].max_norms == []


@pytest.mark.slow
def test_grad_accum_divides_each_micro_batch_loss_before_backward(flagged_loop, plain_loop):
    """With --grad-accum 2 each micro-batch's loss is halved before backward, so an optimizer step's gradient is the
    mean over its micro-batches (undivided, the lr is silently doubled)."""
    spy, _ = flagged_loop
    assert len(spy.losses) == 4  # 2 steps of 2 micro-batches
    assert spy.backward == pytest.approx([x / 2 for x in spy.losses], rel=1e-6)
    plain = plain_loop[0]
    assert len(plain.losses) == 2 and plain.backward == pytest.approx(plain.losses, rel=1e-6)


@pytest.mark.slow
def test_keep_last_is_how_many_checkpoints_retention_keeps(flagged_loop, plain_loop):
    """--keep-last 1 leaves only the newest checkpoint (here also the best) of those saved at steps 1 and 2; the
    default keeps two (ignored, both runs would keep the same)."""
    assert flagged_loop[1] == ["step-000002"]
    assert plain_loop[1] == ["step-000001", "step-000002"]


# --- compile: Accelerate keeps one state per process, so it is built in a fresh one -----------------------------------

COMPILED = """
import sys
from hubtune.config import TrainConfig
from hubtune.job import build_job
job = build_job(TrainConfig(model="test_resnet", pretrained=False, dataset=sys.argv[1], image_size=32, epochs=1,
                            batch_size=8, num_workers=0, progress=False, output_dir=sys.argv[2], report_to="none",
                            max_bad_fraction=0.05, compile=True, compile_backend="aot_eager"))
print(type(job.stepped).__name__, job.accelerator.state.dynamo_plugin.backend.value)
"""


@pytest.mark.slow
def test_compile_and_compile_backend_reach_accelerates_dynamo_plugin(two_class_folder, tmp_path):
    """--compile wraps the stepped model in torch.compile with --compile-backend (not passed: an uncompiled model, or
    inductor). Nothing is compiled until a forward pass, which this test does not make."""
    done = subprocess.run([sys.executable, "-c", COMPILED, str(two_class_folder), str(tmp_path / "run")],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["OptimizedModule", "AOT_EAGER"]
