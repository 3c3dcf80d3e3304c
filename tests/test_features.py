"""--cache-features: the classifier trains on cached backbone features, with the results of the uncached run."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_train import _launch, tiny_config

from hubtune import data, features
from hubtune import model as model_lib
from hubtune.job import cache_key
from hubtune.train import train


def probe(dataset, out, backbone, cache_dir=None, **kw):
    """A linear probe of the pretrained test backbone: everything but the classifier frozen, BN fixed."""
    base = dict(model=f"local-dir:{backbone}", pretrained=True, freeze="stem,stages", freeze_bn=True)
    if cache_dir:
        base.update(feature_cache_dir=str(cache_dir), cache_features=True)
    return tiny_config(dataset, out, **{**base, **kw})


def no_decoding(*args, **kwargs):
    raise AssertionError("an image was decoded although its features were cached")


def assert_same_run(a, b) -> None:
    assert a.history == b.history
    wa, wb = load_file(str(a.output_dir / "model.safetensors")), load_file(str(b.output_dir / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_cached_epochs_replay_without_decoding_and_equal_the_uncached_run(two_class_parquet, backbone, tmp_path,
                                                                           monkeypatch):
    kw = dict(augment=False, epochs=3)
    uncached = train(probe(two_class_parquet, tmp_path / "plain", backbone, **kw))
    # one persistent DataLoader worker: it is replaced when the epochs switch from decoding to replaying
    cached = train(probe(two_class_parquet, tmp_path / "cached", backbone, tmp_path / "cache", num_workers=1, **kw))
    assert_same_run(uncached, cached)
    views = {p.parent.name for p in (tmp_path / "cache").glob("*/*/complete-of-1.json")}
    assert views == {"train", "val"}

    # a new run finds every view complete: no image is decoded (also not in a DataLoader worker), same results
    monkeypatch.setattr(data, "decode", no_decoding)
    monkeypatch.setattr("hubtune.stream.decode", no_decoding)
    replayed = train(probe(two_class_parquet, tmp_path / "replayed", backbone, tmp_path / "cache", num_workers=1,
                           **kw))
    assert_same_run(uncached, replayed)
    # undecodable images are still skipped and counted, as in the image pass
    assert replayed.history[0].skipped == uncached.history[0].skipped
    assert sum(replayed.history[0].skipped.to_json().values()) > 0


@pytest.mark.slow
def test_augmented_views_are_cached_per_epoch_and_replayed(two_class_parquet, backbone, tmp_path, monkeypatch):
    kw = dict(augment=True, epochs=2, cache_views=2)
    uncached = train(probe(two_class_parquet, tmp_path / "plain", backbone, **kw))
    cached = train(probe(two_class_parquet, tmp_path / "cached", backbone, tmp_path / "cache", **kw))
    assert_same_run(uncached, cached)  # epoch e is augmented as the uncached epoch e
    views = {p.parent.name for p in (tmp_path / "cache").glob("*/*/complete-of-1.json")}
    assert views == {"train-view0", "train-view1", "val"}
    monkeypatch.setattr("hubtune.stream.decode", no_decoding)
    assert_same_run(uncached, train(probe(two_class_parquet, tmp_path / "again", backbone, tmp_path / "cache", **kw)))


def test_more_epochs_than_views_reuse_the_views(two_class_parquet, backbone, tmp_path):
    result = train(probe(two_class_parquet, tmp_path / "out", backbone, tmp_path / "cache", augment=True,
                         epochs=3, cache_views=1))
    assert len(result.history) == 3
    views = {p.parent.name for p in (tmp_path / "cache").glob("*/*/complete-of-1.json")}
    assert views == {"train-view0", "val"}


def _spec(backbone, dataset="some/dataset", **kw):
    cfg = probe(dataset, "unused", backbone, cache_dir="unused", **kw)
    net = model_lib.create(cfg.model, num_classes=2, pretrained=True)
    model_lib.freeze(net, model_lib.resolve_freeze(net, cfg.freeze), cfg.freeze_bn)
    data_cfg = model_lib.data_config(net, cfg.image_size)
    train_tf, eval_tf = model_lib.transforms(data_cfg)
    return features.fingerprint(cache_key(cfg), net, data_cfg, train_tf, eval_tf), net


def _digest(spec) -> str:
    return features.FeatureCache("/tmp", spec, 0, 1).dir.name


@pytest.mark.parametrize("change", [dict(image_size=48), dict(model_revision="0123abc"),
                                    dict(dataset_revision="feedbeef"), dict(dataset="other/dataset"),
                                    dict(mixed_precision="bf16"), dict(seed=7), dict(channels_last=True),
                                    dict(jpeg_draft=True), dict(decode_device="cuda")])
def test_cache_is_keyed_by_everything_that_changes_features(backbone, change):
    assert _digest(_spec(backbone, **change)[0]) != _digest(_spec(backbone)[0])


def test_cache_key_ignores_what_does_not_change_features_but_not_the_weights(backbone):
    base, net = _spec(backbone)
    assert _digest(_spec(backbone, lr=0.1, epochs=9, batch_size=3, cache_views=4)[0]) == _digest(base)
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)  # other weights, same name and revision: a fine-tuned backbone
    assert features.weights_digest(net) != base["weights"]


def test_cache_features_refuses_a_backbone_that_trains_or_is_random(two_class_parquet, backbone, tmp_path):
    with pytest.raises(ValueError, match=r"--cache-features trains only the classifier.*--freeze"):
        train(probe(two_class_parquet, tmp_path / "a", backbone, tmp_path / "c", freeze="stem"))
    with pytest.raises(ValueError, match="--freeze-bn"):
        train(probe(two_class_parquet, tmp_path / "b", backbone, tmp_path / "c", freeze_bn=False))
    net = timm.create_model("test_resnet", num_classes=2, drop_path_rate=0.1)
    model_lib.freeze(net, model_lib.resolve_freeze(net, "stem,stages"), True)
    with pytest.raises(ValueError, match="deterministic backbone"):
        features.check_cacheable(net)


def test_an_unwritable_cache_dir_only_costs_the_replay(two_class_parquet, backbone, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    result = train(probe(two_class_parquet, tmp_path / "out", backbone, blocker, augment=False, epochs=2))
    assert len(result.history) == 2 and (result.output_dir / "model.safetensors").exists()
    assert "could not store train" in caplog.text


@pytest.mark.slow
def test_two_processes_share_the_work_and_any_process_count_replays_it(two_class_parquet, backbone, tmp_path,
                                                                         monkeypatch):
    cache = tmp_path / "cache"

    def launch(out, *extra):
        flags = ["--model", f"local-dir:{backbone}", "--dataset", str(two_class_parquet), "--image-size", "32",
                 "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--max-bad-fraction", "0.05",
                 "--shuffle-buffer", "64", "--freeze", "stem,stages", "--freeze-bn", "--no-augment",
                 "--output-dir", str(out), "--no-progress", *extra]
        proc = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "hubtune/train.py", *flags])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, json.loads((out / "metrics.json").read_text())["history"]

    _, uncached = launch(tmp_path / "plain")
    proc, cached = launch(tmp_path / "ddp", "--cache-features", "--feature-cache-dir", str(cache))
    assert "epoch 2: training the classifier on cached features (train)" in proc.stderr
    # the shards are uneven, so ranks stop together before the longer one ends: its last batches are cached too,
    # and the replay stops at the same batch
    assert cached == uncached
    for view in ("train", "val"):
        parts = sorted(p.name for p in cache.glob(f"*/{view}/*"))
        assert parts == ["complete-of-2.json", "part-0-of-2.safetensors", "part-1-of-2.safetensors"]
    # one process reads both parts: every example is found, nothing is decoded
    single = train(probe(two_class_parquet, tmp_path / "single", backbone, augment=False, epochs=1))
    monkeypatch.setattr("hubtune.stream.decode", no_decoding)
    replayed = train(probe(two_class_parquet, tmp_path / "one", backbone, cache, augment=False, epochs=1))
    assert replayed.history[0].train_examples == single.history[0].train_examples
    assert replayed.history[0].skipped == single.history[0].skipped


def test_a_damaged_cache_part_is_recomputed_not_trusted(two_class_parquet, backbone, tmp_path, caplog):
    first = train(probe(two_class_parquet, tmp_path / "a", backbone, tmp_path / "cache", augment=False, epochs=1))
    part = next((tmp_path / "cache").glob("*/train/part-0-of-1.safetensors"))
    part.write_bytes(b"not a safetensors file")
    again = train(probe(two_class_parquet, tmp_path / "b", backbone, tmp_path / "cache", augment=False, epochs=1))
    assert "ignoring an unreadable part" in caplog.text
    assert again.history == first.history
    assert part.stat().st_size > 100  # written again by the recomputing pass
