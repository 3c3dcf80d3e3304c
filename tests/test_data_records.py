"""The data family's records: the validation split keeps today's string on disk, and the typed pieces job.py hands
below it carry exactly the config fields they stand for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hubtune import data, features, recipes, stream, unfreeze
from hubtune.card import _val_split
from hubtune.config import TrainConfig
from hubtune.job import (
    cache_key,
    dataset_source,
    erase_recipe,
    mix_recipe,
    read_settings,
    step_plan,
    thaw_settings,
)
from hubtune.schedule import steps_per_epoch_hint

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("text", ["hash:0.1", "hash:0.25", "split:validation", "split:test", "split:my:odd name"])
def test_val_split_reads_and_writes_the_saved_string_unchanged(text):
    assert data.ValSplit.from_json(text).to_json() == text
    assert str(data.ValSplit.from_json(text)) == text  # what the log line shows


def test_val_split_knows_how_it_was_cut():
    hashed, named = data.ValSplit.from_json("hash:0.1"), data.ValSplit.from_json("split:valid")
    assert (hashed.hashed, hashed.fraction, hashed.name) == (True, 0.1, None)
    assert (named.hashed, named.fraction, named.name) == (False, None, "valid")


def test_val_split_refuses_what_is_not_one():
    with pytest.raises(ValueError, match="not a validation split"):
        data.ValSplit.from_json("random:0.1")


@pytest.mark.parametrize("path", ["records/metrics.json", "cards/run/metrics.json"])
def test_files_written_by_earlier_runs_still_load_their_validation_split(path):
    saved = json.loads((FIXTURES / path).read_text())
    source = saved["run_info"]["val_source"] if "run_info" in saved else saved["val_source"]
    assert data.ValSplit.from_json(source).to_json() == source == "hash:0.1"


def test_the_card_shows_the_split_as_before():
    assert _val_split("hash:0.1") == {"kind": "hash", "fraction": 0.1, "name": None}
    assert _val_split("split:validation") == {"kind": "split", "fraction": None, "name": "validation"}
    assert _val_split(None) == {"kind": None, "fraction": None, "name": None}


def test_open_splits_records_the_split_it_cut(two_class_parquet):
    _, _, info = data.open_splits(data.DatasetSource(str(two_class_parquet), val_fraction=0.3))
    assert info.val_source == data.ValSplit(fraction=0.3)


CHANGED = dict(dataset="org/other", dataset_revision="abc", image_column="img", label_column="lab", val_fraction=0.2,
               seed=7, shuffle_buffer=64, jpeg_draft=True, batch_size=5, num_workers=0, persistent_workers=False,
               epochs=9, max_steps=11, warmup_steps=3, grad_accum=2, weight_decay=0.01, layer_decay=0.7,
               unfreeze_lr_scale=0.5, freeze_bn=True, mixup=0.2, cutmix=1.0, mixup_prob=0.5, mixup_switch_prob=0.25,
               mixup_mode="pair", smoothing=0.1, reprob=0.25, remode="const", recount=3)


def test_each_typed_piece_carries_its_flags():
    """A flag that stopped reaching its piece (a copy of the default, a swapped field) would fail here."""
    cfg = TrainConfig(**CHANGED)
    assert dataset_source(cfg) == data.DatasetSource("org/other", "abc", "img", "lab", 0.2)
    assert read_settings(cfg) == stream.ReadSettings(seed=7, shuffle_buffer=64, jpeg_draft=True, batch_size=5,
                                                     num_workers=0, persistent_workers=False)
    plan = step_plan(cfg)
    assert (plan.epochs, plan.max_steps, plan.warmup_steps, plan.batch_size, plan.grad_accum) == (9, 11, 3, 5, 2)
    assert thaw_settings(cfg) == unfreeze.ThawSettings(weight_decay=0.01, layer_decay=0.7, lr_scale=0.5,
                                                       freeze_bn=True)
    assert mix_recipe(cfg) == recipes.MixRecipe(mixup=0.2, cutmix=1.0, prob=0.5, switch_prob=0.25, mode="pair",
                                                smoothing=0.1)
    assert erase_recipe(cfg) == recipes.EraseRecipe(prob=0.25, mode="const", max_count=3)
    assert mix_recipe(TrainConfig()) is None and recipes.make_mixup(None, 2) is None
    assert recipes.make_eraser(erase_recipe(TrainConfig()), torch.device("cpu")) is None


def test_the_cache_key_holds_the_declared_fields_and_the_seed_only_with_augmentation():
    key = cache_key(TrainConfig(seed=3, augment=True))
    assert "dataset" in key.settings and "seed" not in key.settings and key.augment_seed == 3
    assert cache_key(TrainConfig(seed=3, augment=False)).augment_seed is None


def test_views_cycle_only_with_augmentation():
    assert [features.view_for(2, e) for e in range(4)] == ["train-view0", "train-view1", "train-view0", "train-view1"]
    assert features.view_for(None, 3) == "train"


def test_steps_per_epoch_leave_out_the_hashed_validation_share():
    plan = step_plan(TrainConfig(batch_size=10, grad_accum=1))
    info = data.DataInfo("image", "label", ["a", "b"], data.ValSplit(fraction=0.5), 100, None)
    assert steps_per_epoch_hint(plan, info, 1) == 5
    named = data.DataInfo("image", "label", ["a", "b"], data.ValSplit(name="validation"), 100, None)
    assert steps_per_epoch_hint(plan, named, 2) == 5


def test_a_decode_plan_crosses_to_the_training_process_and_replays_as_drawn():
    """Plans are drawn in loader workers and pickled to the training process: the record must arrive whole."""
    import io
    import pickle

    import timm
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from hubtune import device_decode
    from hubtune import model as model_lib

    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    train_tf, _ = model_lib.transforms(model_lib.data_config(net, 32))
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buf, "JPEG")
    plan = device_decode.plan(buf.getvalue(), train_tf, seed=11)
    assert isinstance(plan, device_decode.DecodePlan) and plan.orientation == 1
    assert isinstance(plan.steps[0], device_decode.ResizedCrop) and plan.steps[0].size == [32, 32]
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert device_decode.plan(buf.getvalue(), train_tf, seed=11) == plan  # the seed decides every draw
    image = F.pil_to_tensor(Image.open(io.BytesIO(plan.data)).convert("RGB"))
    assert device_decode.replay(image, plan.steps).shape == (3, 32, 32)
    batch = device_decode.BatchDecoder(torch.device("cpu"))(
        stream.Batch(None, torch.tensor([0, 1]), [1, 2], n_bad=0, parts=[plan, None], n_fallback=0))
    assert batch.pixel_values.shape == (1, 3, 32, 32) and batch.keys == [1] and batch.n_bad == 1
    assert batch.parts is None and batch.labels.tolist() == [0]


def test_a_batch_survives_the_loader_workers_and_pinning():
    """collate runs in the workers: the batch is pickled to the training process, then (on CUDA) pinned."""
    import pickle

    batch = stream.collate([{"pixel_values": torch.ones(3, 2, 2, dtype=torch.uint8), "label": 1, "key": 5, "ok": True},
                            {"pixel_values": None, "label": 0, "key": 6, "ok": False}])
    back = pickle.loads(pickle.dumps(batch))
    assert torch.equal(back.images(), batch.images()) and back.keys == [5] and back.n_bad == 1
    assert back.position == {} and back.waited == 0.0  # the training loop fills them in
    if torch.cuda.is_available():
        pinned = torch.utils.data._utils.pin_memory.pin_memory(batch)
        assert isinstance(pinned, stream.Batch) and pinned.images().is_pinned() and pinned.labels.is_pinned()


def test_a_loader_yields_batch_records(two_class_parquet):
    source = data.DatasetSource(str(two_class_parquet), val_fraction=0.3)
    train_src, _, info = data.open_splits(source)
    ds = stream.ExampleStream(data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=0),
                              lambda img: torch.zeros(3, 4, 4, dtype=torch.uint8), keep_val=False, val_fraction=0.3,
                              seed=0, shuffle_buffer=8)
    batches = list(stream.make_loader(ds, 4, 1, False))
    assert batches and all(isinstance(b, stream.Batch) for b in batches)
    assert sum(len(b.labels) + b.n_bad for b in batches) == sum(1 for _ in ds)


def test_a_job_is_built_complete():
    """Every field of Job is given by build_job when it constructs it: nothing is filled in afterwards."""
    import dataclasses

    from hubtune.job import Job

    assert all(f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(Job))


def test_unfreezing_returns_what_changed_and_leaves_the_caller_to_apply_it():
    import timm
    from accelerate import Accelerator
    from timm.optim import create_optimizer_v2

    from hubtune import model as model_lib

    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    frozen = model_lib.resolve_freeze(net, "stem,stages")
    model_lib.freeze(net, frozen, False)
    accelerator = Accelerator(cpu=True)
    stepped, optimizer = accelerator.prepare(net, create_optimizer_v2(net, opt="sgd", lr=0.1))
    schedule = unfreeze.resolve_schedule(net, [("stages", 2)], "stem,stages", frozen)
    thaw = unfreeze.ThawSettings(weight_decay=0.0, layer_decay=None, lr_scale=0.5, freeze_bn=False)
    groups = len(optimizer.optimizer.param_groups)
    assert unfreeze.apply(net, optimizer, accelerator, stepped, schedule, frozen, thaw, 1) is None
    thawed = unfreeze.apply(net, optimizer, accelerator, stepped, schedule, frozen, thaw, 2)
    assert thawed is not None and thawed.stepped is stepped  # one process: nothing to prepare again
    started = set(schedule[0][2])
    assert started and thawed.frozen == [n for n in frozen if n not in started] and thawed.frozen
    assert len(optimizer.optimizer.param_groups) > groups
    assert all(g["lr_scale"] == 0.5 for g in optimizer.optimizer.param_groups[groups:])
