"""Data: decoding every image mode to RGB, skipping broken files, column discovery, the stable val split."""

import io
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from helpers import BAD_FILES, CLASSES, examples, make_image_dataset
from PIL import Image

from hubtune import data, stream
from hubtune.config import TrainConfig
from hubtune.job import dataset_source


def test_odd_modes_become_rgb_and_exif_orientation_is_applied():
    items = {name: blob for name, blob, _ in examples(per_class=1, odd=True)}
    for name in ("gray.png", "palette.png", "rgba.png", "cmyk.jpg", "deep16.png", "exif_rotated.jpg"):
        img = data.decode(items[name])
        assert img is not None and img.mode == "RGB", name
    assert data.decode(items["exif_rotated.jpg"]).size == (30, 40)  # stored 40x30, orientation 6 rotates it
    deep = data.decode(items["deep16.png"])
    assert max(deep.getextrema()[0]) > 100  # 16-bit range scaled, not clipped to white/black
    rgba = data.decode(items["rgba.png"])
    assert rgba.getpixel((0, 0))[0] > 128  # composited on white, not on black


def test_broken_images_decode_to_none():
    items = {name: blob for name, blob, _ in examples(per_class=1, bad=True)}
    for name, _ in BAD_FILES:
        assert data.decode(items[name]) is None, name


def _cfg(dataset, **kw):
    return dataset_source(TrainConfig(dataset=str(dataset), **kw))


@pytest.mark.parametrize("fixture", ["two_class_parquet", "two_class_folder"])
def test_columns_and_classes_found_by_feature_type(fixture, request):
    train, val, info = data.open_splits(_cfg(request.getfixturevalue(fixture)))
    assert info.class_names == list(CLASSES)
    assert info.val_source.to_json() == "hash:0.1"
    assert info.label_column in ("labels", "label")


def test_wrong_column_lists_the_columns_that_exist(two_class_parquet):
    with pytest.raises(ValueError, match=r"--label-column 'target' is not in the dataset; columns: image \(Image\), labels \(ClassLabel\)"):
        data.open_splits(_cfg(two_class_parquet, label_column="target"))
    with pytest.raises(ValueError, match=r"--image-column 'labels' is ClassLabel, expected a Image column"):
        data.open_splits(_cfg(two_class_parquet, image_column="labels"))


def test_missing_local_dataset_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no such local file or directory"):
        data.open_splits(_cfg(tmp_path / "nope" / "x"))


def _hashes(path, keep_val, rank=0, world=1, shuffle_seed=None):
    train, _, info = data.open_splits(_cfg(path))
    source = data.process_source(train, info, rank=rank, world_size=world, shuffle_seed=shuffle_seed)
    ds = stream.ExampleStream(source, lambda img: img.tobytes(), keep_val=keep_val, val_fraction=0.1,
                              seed=shuffle_seed, shuffle_buffer=16)
    return [hash(ex["pixel_values"]) for ex in ds if ex["pixel_values"] is not None]


def test_val_split_is_disjoint_stable_and_independent_of_processes_and_shuffle(two_class_parquet):
    val_1 = _hashes(two_class_parquet, True)
    train_1 = _hashes(two_class_parquet, False)
    assert val_1 and train_1 and not set(val_1) & set(train_1)
    val_2 = _hashes(two_class_parquet, True, 0, 2) + _hashes(two_class_parquet, True, 1, 2)
    assert sorted(val_2) == sorted(val_1)
    assert sorted(_hashes(two_class_parquet, True, shuffle_seed=3)) == sorted(val_1)
    assert sorted(_hashes(two_class_parquet, False, shuffle_seed=3)) == sorted(train_1)


def test_hash_split_keeps_each_class_near_the_fraction():
    blobs = [(b, lab) for _, b, lab in examples(per_class=400, odd=False)]
    for label in (0, 1):
        share = sum(stream.in_val(stream.content_key(b), 0.2) for b, lab in blobs if lab == label) / 400
        assert 0.14 < share < 0.26


def test_existing_validation_split_is_used_as_is(tmp_path):
    for split, per_class in (("train", 20), ("validation", 5)):
        make_image_dataset(tmp_path / split, "imagefolder", per_class=per_class, seed=len(split))
    _, val, info = data.open_splits(_cfg(tmp_path))
    assert info.val_source.to_json() == "split:validation"
    assert sum(1 for _ in val) == 2 * 5 + 6


def test_collate_drops_and_counts_bad_examples():
    good = {"pixel_values": torch.zeros(3, 4, 4), "label": 1, "key": 7, "ok": True}
    batch = stream.collate([good, {"pixel_values": None, "label": 0, "key": 9, "ok": False}, good])
    assert batch.pixel_values.shape == (2, 3, 4, 4) and batch.n_bad == 1
    assert batch.labels.tolist() == [1, 1]
    assert batch.keys == [7, 7]


def test_jpeg_draft_decodes_large_photos_at_a_reduced_scale_never_below_the_target():
    rng = np.random.default_rng(0)
    # smooth content, as in photos: DCT scaling then differs from a full decode only by rounding-level detail
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((1024, 768), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    full, drafted = data.decode(buf.getvalue()), data.decode(buf.getvalue(), draft=200)
    assert full.size == (1024, 768)
    assert drafted.size == (512, 384)  # 1/4 would make the short side 192 < 200
    assert data.decode(buf.getvalue(), draft=800).size == (1024, 768)  # no scale keeps both sides >= 800
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert data.decode(png.getvalue(), draft=200).size == (1024, 768)  # only JPEG has DCT scaling
    # what the eval transform makes of either is nearly the same image
    tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    a = np.asarray(tf(full), dtype=np.float64)
    b = np.asarray(tf(drafted), dtype=np.float64)
    assert np.abs(a - b).mean() < 2.0


LOADER_SCRIPT = """
import gc, sys
from hubtune import data, stream
train, _, info = data.open_splits(data.DatasetSource(sys.argv[1], val_fraction=0.1))
ds = stream.ExampleStream(data.process_source(train, info, rank=0, world_size=1, shuffle_seed=0), lambda im: None,
                          keep_val=False, val_fraction=0.1, seed=0, shuffle_buffer=8)
loader = stream.make_loader(ds, 4, 2, False, persistent_workers=sys.argv[2] == "persistent")
assert loader.num_workers == 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("persistent", ["persistent", "fresh"])
def test_loaders_left_open_or_collected_do_not_hang_the_interpreter_at_exit(two_row_groups, persistent):
    # workers ignore SIGTERM (the main process saves first), and SIGTERM is how multiprocessing stops them at exit
    script = LOADER_SCRIPT + """
mid_epoch = iter(loader)
next(mid_epoch)
after_a_pass = stream.make_loader(ds, 4, 2, False, persistent_workers=sys.argv[2] == "persistent")
n = sum(1 for _ in after_a_pass)
# cyclic garbage, as under an exception's traceback: the iterator's queues are collected with it
cyclic = stream.make_loader(ds, 4, 2, False, persistent_workers=sys.argv[2] == "persistent")
it = iter(cyclic)
next(it)
cyclic.cycle = cyclic
del it, cyclic
gc.collect()
print("left them", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(two_row_groups), persistent], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "left them" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_workers_leave_a_sigterm_to_the_main_process_while_their_iterator_is_open(two_row_groups):
    """A scheduler's SIGTERM to every process must not kill the workers before the main process has saved."""
    script = LOADER_SCRIPT + """
import os, signal
it = iter(loader)
first = next(it)
for w in it._workers:
    os.kill(w.pid, signal.SIGTERM)
rest = sum(1 for _ in it)  # raises if a worker died
print("batches after the signal", rest, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(two_row_groups), "persistent"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) >= 2


def test_names_that_are_neither_local_nor_hub_ids_are_one_line_errors(hub, tmp_path):
    from hubtune.errors import DataError

    for name in ("nosuch", "a/b/c", "./missing"):
        with pytest.raises(DataError, match=rf"--dataset {name!r}: no such local file or directory, and not a Hub "
                                            r"dataset id \(org/name\)"):
            data.open_splits(_cfg(name))
    with pytest.raises(DataError, match="--dataset 'alice/nosuch': no such dataset on the Hub or locally"):
        data.open_splits(_cfg("alice/nosuch"))


def test_a_single_class_label_column_is_refused(tmp_path):
    from hubtune.errors import DataError

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    items = examples(per_class=3, odd=False)[:3]
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": n} for n, b, _ in items], "label": [0, 0, 0]},
                               features=features).to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(DataError, match=r"has 1 class \(\['cat'\]\) in 'label': a classifier needs at least two"):
        data.open_splits(_cfg(tmp_path / "one.parquet"))


SPLIT_MEMBERS = """
import hashlib, json, sys
from hubtune import data, stream
from hubtune.config import TrainConfig
from hubtune.job import dataset_source
path, world = sys.argv[1], int(sys.argv[2])
train, _, info = data.open_splits(dataset_source(TrainConfig(dataset=path)))
members = []
for rank in range(world):
    source = data.process_source(train, info, rank=rank, world_size=world, shuffle_seed=rank)
    ds = stream.ExampleStream(source, lambda img: hashlib.sha256(img.tobytes()).hexdigest(), keep_val=True,
                              val_fraction=0.3, seed=None, shuffle_buffer=16)
    members += [ex["pixel_values"] for ex in ds if ex["ok"]]
print(json.dumps(sorted(members)))
"""


@pytest.mark.slow
def test_the_validation_split_is_the_same_in_every_process_and_process_count(two_class_parquet):
    """Python's own hash() is salted per process: a split keyed on it would differ between runs and ranks."""
    import json
    import os

    runs = []
    for hash_seed, world in (("1", 1), ("2", 3)):
        proc = subprocess.run([sys.executable, "-c", SPLIT_MEMBERS, str(two_class_parquet), str(world)],
                              env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.splitlines()[-1]))
    assert 20 < len(runs[0]) < 60 and runs[0] == runs[1]
