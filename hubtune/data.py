"""Streaming image-classification data: loading, column discovery, the hash validation split, decoding, loaders."""

from __future__ import annotations

import glob
import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
# Everything PIL and datasets raise for unreadable, truncated or hostile image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, KeyError, IndexError)


@dataclass
class DataInfo:
    """What the run learned about its dataset before training."""

    image_column: str
    label_column: str
    class_names: list[str]
    val_source: str  # "split:<name>" or "hash:<fraction>"
    train_size_hint: int | None  # examples in the training split before the val hold-out, when the metadata says
    revision: str | None  # dataset commit sha on the Hub, when it came from there


def _load(cfg: Any) -> tuple[datasets.IterableDatasetDict, str | None]:
    """Open the dataset as a streaming IterableDatasetDict, plus the commit sha when it comes from the Hub."""
    local = Path(cfg.dataset).expanduser()
    matches = sorted(glob.glob(str(local))) if any(c in cfg.dataset for c in "*?[") else []
    if local.is_dir():
        parquet = sorted(str(p) for p in local.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files={"train": parquet}, streaming=True), None
        return datasets.load_dataset("imagefolder", data_dir=str(local), streaming=True), None
    if local.is_file() or matches:
        files = matches or [str(local)]
        if not all(f.endswith(".parquet") for f in files):
            raise ValueError(f"--dataset {cfg.dataset!r}: local files must be .parquet; or give an imagefolder directory")
        return datasets.load_dataset("parquet", data_files={"train": files}, streaming=True), None
    if cfg.dataset.startswith((".", "/", "~")) or cfg.dataset.count("/") > 1:
        raise ValueError(f"--dataset {cfg.dataset!r}: no such local file or directory (or give a Hub id org/name)")
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        # pin the commit once, so every process, epoch and a later reproduction read the same files
        sha = cfg.dataset_revision if HF_HUB_OFFLINE else HfApi().dataset_info(cfg.dataset, revision=cfg.dataset_revision).sha
        return datasets.load_dataset(cfg.dataset, revision=sha, streaming=True), sha
    except RevisionNotFoundError as err:
        raise ValueError(f"--dataset-revision {cfg.dataset_revision!r} does not exist in {cfg.dataset}") from err
    except (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"--dataset {cfg.dataset!r}: no such dataset on the Hub or locally "
            "(private or gated? set HF_TOKEN or run `hf auth login`)"
        ) from err


def _describe(features: datasets.Features) -> str:
    return ", ".join(f"{name} ({type(feat).__name__})" for name, feat in features.items())


def _pick_column(features: datasets.Features, wanted: str | None, kind: type, flag: str) -> str:
    if wanted is not None:
        if wanted not in features:
            raise ValueError(f"{flag} {wanted!r} is not in the dataset; columns: {_describe(features)}")
        if not isinstance(features[wanted], kind):
            raise ValueError(
                f"{flag} {wanted!r} is {type(features[wanted]).__name__}, expected a {kind.__name__} column; "
                f"columns: {_describe(features)}"
            )
        return wanted
    found = [name for name, feat in features.items() if isinstance(feat, kind)]
    if not found:
        raise ValueError(f"no {kind.__name__} column found, pass {flag}; columns: {_describe(features)}")
    return found[0]


def open_splits(cfg: Any) -> tuple[datasets.IterableDataset, datasets.IterableDataset, DataInfo]:
    """Return (train, val) streams of {image: {bytes, path}, label} plus what was learned about the dataset."""
    dsd, revision = _load(cfg)
    if "train" not in dsd:
        raise ValueError(f"--dataset {cfg.dataset!r} has no 'train' split; splits: {', '.join(dsd)}")
    train = dsd["train"]
    features = train.features
    if features is None:
        raise ValueError(f"--dataset {cfg.dataset!r}: its features are unknown; store it as parquet or imagefolder")
    image_col = _pick_column(features, cfg.image_column, datasets.Image, "--image-column")
    label_col = _pick_column(features, cfg.label_column, datasets.ClassLabel, "--label-column")
    val_name = next((name for name in VAL_SPLIT_NAMES if name in dsd), None)
    keep = [image_col, label_col]
    train = train.select_columns(keep).cast_column(image_col, datasets.Image(decode=False))
    if val_name:
        val = dsd[val_name].select_columns(keep).cast_column(image_col, datasets.Image(decode=False))
    else:
        val = train
    splits = train.info.splits
    size_hint = splits["train"].num_examples if splits and "train" in splits else None
    info = DataInfo(
        image_column=image_col,
        label_column=label_col,
        class_names=list(features[label_col].names),
        val_source=f"split:{val_name}" if val_name else f"hash:{cfg.val_fraction}",
        train_size_hint=size_hint,
        revision=revision,
    )
    return train, val, info


def image_bytes(value: dict[str, Any]) -> bytes:
    """The encoded image, read through datasets' xopen when only a path is stored (imagefolder)."""
    if value.get("bytes") is not None:
        return value["bytes"]
    try:
        with xopen(value["path"], "rb") as f:
            return f.read()
    except (OSError, ValueError, TypeError):
        return b""


def in_val(data: bytes, fraction: float) -> bool:
    """Stable membership: a hash of the image content, the same in every run, process and shuffle order.

    Each class keeps `fraction` of its examples in validation (in expectation), so the split is stratified;
    identical images always land on the same side, so duplicates cannot leak from train into val.
    """
    digest = hashlib.blake2b(data, digest_size=8, person=b"hubtune-val").digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, LA, RGBA, CMYK, I;16, I, F) to RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode(data: bytes) -> Image.Image | None:
    """Decode to an upright RGB image, or None when the bytes are not a readable image."""
    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except DECODE_ERRORS:
        return None


def _split_side(example: dict, fraction: float, keep_val: bool) -> bool:
    return in_val(example["data"], fraction) == keep_val


def _prepare(example: dict, image_col: str, label_col: str) -> dict:
    return {"data": image_bytes(example[image_col]), "label": example[label_col]}


def _transform(example: dict, transform: Callable) -> dict:
    img = decode(example["data"])
    return {"pixel_values": None if img is None else transform(img), "label": example["label"]}


def build_stream(
    ds: datasets.IterableDataset,
    info: DataInfo,
    transform: Callable,
    *,
    keep_val: bool | None,
    val_fraction: float,
    rank: int,
    world_size: int,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1000,
) -> datasets.IterableDataset:
    """Shard for this process, shuffle, apply the hash split (keep_val None: no split), decode and transform.

    Each process reads only its own part of the stream with `split_dataset_by_node` (by whole parquet row groups
    when they divide evenly). Accelerate's dispatching would make rank 0 read and decode every batch and broadcast
    it, and its IterableDatasetShard would make every rank read and decode every batch; both waste the input
    pipeline that is the bottleneck on image data.
    """
    if world_size > 1:
        ds = split_dataset_by_node(ds.reshard(), rank=rank, world_size=world_size)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
    ds = ds.map(_prepare, fn_kwargs={"image_col": info.image_column, "label_col": info.label_column},
                remove_columns=[info.image_column, info.label_column])
    if keep_val is not None:
        ds = ds.filter(functools.partial(_split_side, fraction=val_fraction, keep_val=keep_val))
    return ds.map(_transform, fn_kwargs={"transform": transform}, remove_columns=["data"])


def collate(batch: list[dict]) -> dict[str, Any]:
    """Stack decodable examples; undecodable ones are dropped here and counted in `n_bad`."""
    good = [ex for ex in batch if ex["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in good]) if good else None,
        "labels": torch.tensor([ex["label"] for ex in good], dtype=torch.long),
        "n_bad": len(batch) - len(good),
    }


def make_loader(ds: datasets.IterableDataset, batch_size: int, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    # datasets hands whole shards to workers: more workers than shards would sit idle
    workers = min(num_workers, max(ds.num_shards, 1))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
