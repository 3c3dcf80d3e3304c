"""Streaming image-classification data: loading, column discovery, per-process sources, image decoding."""

from __future__ import annotations

import glob
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps

from hubtune.errors import DataError
from hubtune.sources import is_hub_id

logger = logging.getLogger("hubtune")

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
# The largest image file read: well above any image PIL decodes without calling it a decompression bomb (2 x
# Image.MAX_IMAGE_PIXELS RGBA pixels, 716 MB uncompressed), and far below what would exhaust a machine's memory
# when a file (a sparse one, a device) claims to be huge.
MAX_IMAGE_BYTES = 2**30
# Everything PIL and datasets raise for unreadable, truncated or hostile image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, KeyError, IndexError)


@dataclass(frozen=True)
class ValSplit:
    """Where validation examples come from: a split of the dataset (`name`), or else the `fraction` of the training
    split that its content hash holds out (hubtune.stream.in_val). Saved as "split:<name>" or "hash:<fraction>"."""

    name: str | None = None
    fraction: float | None = None

    @property
    def hashed(self) -> bool:
        """Cut from the training split by content hash (the dataset has no validation split)."""
        return self.name is None

    def to_json(self) -> str:
        return f"split:{self.name}" if self.name is not None else f"hash:{self.fraction}"

    @classmethod
    def from_json(cls, text: str) -> ValSplit:
        """The split a "split:<name>" or "hash:<fraction>" string names (metrics.json, a checkpoint's run record).

        Raises:
            ValueError: the string is neither.
        """
        kind, _, value = text.partition(":")
        if kind == "split":
            return cls(name=value)
        if kind == "hash":
            return cls(fraction=float(value))
        raise ValueError(f"not a validation split: {text!r} (expected 'split:<name>' or 'hash:<fraction>')")

    def __str__(self) -> str:
        return self.to_json()


@dataclass(frozen=True)
class DatasetSource:
    """Where a run's examples come from: --dataset (a Hub id or local files) at a revision, its columns, and the
    fraction held out for validation when it has no validation split."""

    dataset: str
    revision: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    val_fraction: float = 0.0


@dataclass
class DataInfo:
    """What the run learned about its dataset before training."""

    image_column: str
    label_column: str
    class_names: list[str]
    val_source: ValSplit
    train_size_hint: int | None  # examples in the training split before the val hold-out, when the metadata says
    revision: str | None  # dataset commit sha on the Hub, when it came from there


def _load(source: DatasetSource) -> tuple[datasets.IterableDatasetDict, str | None]:
    """Open the dataset as a streaming IterableDatasetDict, plus the commit sha when it comes from the Hub."""
    dataset, revision = source.dataset, source.revision
    local = Path(dataset).expanduser()
    matches = sorted(glob.glob(str(local))) if any(c in dataset for c in "*?[") else []
    if local.is_dir():
        parquet = sorted(str(p) for p in local.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files={"train": parquet}, streaming=True), None
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(local), streaming=True), None
        except datasets.data_files.EmptyDatasetError as err:
            raise DataError(f"--dataset {dataset!r}: this directory holds no image or parquet files; an "
                            "imagefolder has one subfolder of images per class (under train/, test/... for splits)"
                            ) from err
    if local.is_file() or matches:
        files = matches or [str(local)]
        if not all(f.endswith(".parquet") for f in files):
            raise DataError(f"--dataset {dataset!r}: local files must be .parquet; or give an imagefolder directory")
        return datasets.load_dataset("parquet", data_files={"train": files}, streaming=True), None
    if not is_hub_id(dataset):
        raise DataError(f"--dataset {dataset!r}: no such local file or directory, and not a Hub dataset id "
                        "(org/name)")
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    from hubtune.hub import api, cached_dataset_dir
    from hubtune.hub_calls import answered

    if is_offline_mode():  # compute nodes without internet: the snapshot `hubtune prefetch` cached
        snapshot = cached_dataset_dir(dataset, revision)
        return datasets.load_dataset(str(snapshot), streaming=True), snapshot.name
    try:
        # pin the commit once, so every process, epoch and a later reproduction read the same files
        with answered(f"--dataset {dataset!r}"):
            sha = api().dataset_info(dataset, revision=revision).sha
            return datasets.load_dataset(dataset, revision=sha, streaming=True), sha
    except RevisionNotFoundError as err:
        raise DataError(f"--dataset-revision {revision!r} does not exist in {dataset}") from err
    except HFValidationError as err:
        raise DataError(f"--dataset {dataset!r} is not a valid Hub dataset id: {err}") from err
    except (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(
            f"--dataset {dataset!r}: no such dataset on the Hub or locally "
            "(private or gated? set HF_TOKEN or run `hf auth login`)"
        ) from err


def _describe(features: datasets.Features) -> str:
    return ", ".join(f"{name} ({type(feat).__name__})" for name, feat in features.items())


def _pick_column(features: datasets.Features, wanted: str | None, kind: type, flag: str) -> str:
    if wanted is not None:
        if wanted not in features:
            raise DataError(f"{flag} {wanted!r} is not in the dataset; columns: {_describe(features)}")
        if not isinstance(features[wanted], kind):
            raise DataError(
                f"{flag} {wanted!r} is {type(features[wanted]).__name__}, expected a {kind.__name__} column; "
                f"columns: {_describe(features)}"
            )
        return wanted
    found = [name for name, feat in features.items() if isinstance(feat, kind)]
    if not found and kind is datasets.ClassLabel:
        raise DataError(f"no ClassLabel column found, so the dataset has no class labels (columns: "
                        f"{_describe(features)}); an imagefolder needs one subfolder per class, at least two, or pass "
                        f"{flag} with a ClassLabel column")
    if not found:
        raise DataError(f"no {kind.__name__} column found, pass {flag}; columns: {_describe(features)}")
    return found[0]


def open_splits(source: DatasetSource) -> tuple[datasets.IterableDataset, datasets.IterableDataset, DataInfo]:
    """Return (train, val) streams of {image: {bytes, path}, label} plus what was learned about the dataset."""
    dsd, revision = _load(source)
    if "train" not in dsd:
        raise DataError(f"--dataset {source.dataset!r} has no 'train' split; splits: {', '.join(dsd)}")
    train = dsd["train"]
    features = train.features
    if features is None:
        raise DataError(f"--dataset {source.dataset!r}: its features are unknown; store it as parquet or imagefolder")
    image_col = _pick_column(features, source.image_column, datasets.Image, "--image-column")
    label_col = _pick_column(features, source.label_column, datasets.ClassLabel, "--label-column")
    names = list(features[label_col].names)
    if len(names) < 2:
        raise DataError(f"--dataset {source.dataset!r} has {len(names)} class ({names}) in {label_col!r}: a classifier "
                        "needs at least two; add images of another class (an imagefolder subfolder per class)")
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
        val_source=ValSplit(name=val_name) if val_name else ValSplit(fraction=source.val_fraction),
        train_size_hint=size_hint,
        revision=revision,
    )
    return train, val, info


EVAL_SPLIT_NAMES = ("test", *VAL_SPLIT_NAMES)


def open_eval_split(dataset: str, split: str | None, revision: str | None, image_column: str | None,
                    label_column: str | None) -> tuple[datasets.IterableDataset, DataInfo]:
    """One split to evaluate on (default: test, else validation; for a local dataset with neither, its only split:
    the folder or files the user points at are the evaluation set) as a stream of {image: {bytes, path}, label}.
    A Hub dataset with only a train split is refused: that is training data.

    Raises:
        DataError: the dataset, the split or a column does not exist.
    """
    dsd, pinned = _load(DatasetSource(dataset, revision))
    name = split or next((n for n in EVAL_SPLIT_NAMES if n in dsd), None)
    if name is None and pinned is None and len(dsd) == 1:  # local: only a Hub dataset has a pinned commit
        name = next(iter(dsd))
    if name not in dsd:
        wanted = f"no split {split!r}" if split else "no test or validation split"
        raise DataError(f"--dataset {dataset!r} has {wanted}; splits: {', '.join(dsd)} (choose one with --split)")
    stream = dsd[name]
    if stream.features is None:
        raise DataError(f"--dataset {dataset!r}: its features are unknown; store it as parquet or imagefolder")
    image_col = _pick_column(stream.features, image_column, datasets.Image, "--image-column")
    label_col = _pick_column(stream.features, label_column, datasets.ClassLabel, "--label-column")
    stream = stream.select_columns([image_col, label_col]).cast_column(image_col, datasets.Image(decode=False))
    splits = stream.info.splits
    return stream, DataInfo(image_column=image_col, label_column=label_col,
                            class_names=list(stream.features[label_col].names), val_source=ValSplit(name=name),
                            train_size_hint=splits[name].num_examples if splits and name in splits else None,
                            revision=pinned)


def image_bytes(value: dict[str, Any]) -> bytes:
    """The encoded image, read through datasets' xopen when only a path is stored (imagefolder); b"" (an image that
    is skipped and counted) when it cannot be read or is over MAX_IMAGE_BYTES."""
    if value.get("bytes") is not None:
        return value["bytes"]
    try:
        with xopen(value["path"], "rb") as f:
            return read_image_file(f)
    except ImageTooLarge as err:
        logger.warning(f"skipping {value['path']}: {err}")
        return b""
    except (OSError, ValueError, TypeError):
        return b""


class ImageTooLarge(ValueError):
    """An image file over MAX_IMAGE_BYTES; the message says how large it is (or claims to be)."""


def read_image_file(f: IO[bytes]) -> bytes:
    """All of an open image file, refused (ImageTooLarge) over MAX_IMAGE_BYTES without reading it: by the size it
    reports, and by a read that stops one byte past the limit, since a file may hold more than it reports."""
    try:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
    except (OSError, ValueError, AttributeError):  # not seekable: the capped read alone decides
        size = 0
    if size > MAX_IMAGE_BYTES:
        raise ImageTooLarge(f"the file is {size / 2**30:.1f} GiB, over the {MAX_IMAGE_BYTES / 2**30:.0f} GiB limit "
                            "for one image (hubtune.data.MAX_IMAGE_BYTES)")
    data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageTooLarge(f"the file holds more than the {MAX_IMAGE_BYTES / 2**30:.0f} GiB limit for one image "
                            "(hubtune.data.MAX_IMAGE_BYTES)")
    return data


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


def decode(data: bytes, draft: int | None = None) -> Image.Image | None:
    """Decode to an upright RGB image, or None when the bytes are not a readable image.

    `draft`: let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as both sides stay >= `draft`
    pixels; much faster on large photos, but the pixels differ slightly from a full decode followed by a resize.
    """
    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not in place, it copies even upright images
        return to_rgb(img)
    except DECODE_ERRORS:
        return None


def _prepare(example: dict, image_col: str, label_col: str) -> dict:
    return {"data": image_bytes(example[image_col]), "label": example[label_col]}


def process_source(ds: datasets.IterableDataset, info: DataInfo, *, rank: int, world_size: int,
                   shuffle_seed: int | None) -> datasets.IterableDataset:
    """This process's part of a split as {data: bytes, label}, with the shard order shuffled per epoch.

    Each process reads only its own part of the stream with `split_dataset_by_node` (by whole parquet row groups
    when they divide evenly). Accelerate's dispatching would make rank 0 read and decode every batch and broadcast
    it, and its IterableDatasetShard would make every rank read and decode every batch; both waste the input
    pipeline that is the bottleneck on image data. Example order within shards is shuffled in hubtune.stream.
    """
    ds = ds.reshard()  # parquet row groups become shards: finer splitting and cheap position restores
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if shuffle_seed is not None:
        # buffer_size=1 shuffles only the shard order (restorably); examples are shuffled in hubtune.stream.
        # One input shard at a time: interleaving shards runs datasets' thread pool, whose shutdown sleeps 5 s at
        # the end of every pass (apache/arrow#45214); hubtune's shuffle blocks already span several row groups.
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=1, max_buffer_input_shards=1)
    return ds.map(_prepare, fn_kwargs={"image_col": info.image_column, "label_col": info.label_column},
                  remove_columns=[info.image_column, info.label_column])
