"""The per-process example stream: block shuffle, hash split, decode, seeded augmentation; resumable exactly.

datasets' own shuffle buffer is not restorable (its state_dict drops the buffer content, so a resumed epoch
would skip what was in it). Here the stream is cut into blocks of `shuffle_buffer` examples, each permuted by
a generator seeded from (seed, epoch, worker, block). A position is (datasets' state at the block start, block,
offset): resuming re-reads at most one block, however far into the epoch the run was. Augmentation is seeded
per example from (seed, epoch, image content), so it does not depend on worker count, process count or resume.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import importlib
import random
import signal
import warnings
import weakref
from itertools import islice
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from hubtune.data import decode

# torchdata 0.11 calls a deprecated torch API on every iterator; nothing for users to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def content_key(data: bytes) -> int:
    """A stable 64-bit key of the image bytes (val membership and augmentation seeds)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"hubtune-val").digest(), "big")


def in_val(data: bytes, fraction: float) -> bool:
    """Stable membership: a hash of the image content, the same in every run, process and shuffle order.

    Each class keeps `fraction` of its examples in validation (in expectation), so the split is stratified;
    identical images always land on the same side, so duplicates cannot leak from train into val.
    """
    return content_key(data) / 2**64 < fraction


def _seeded(transform: Callable, img: Any, seed: int) -> Any:
    """Run `transform` with python/numpy/torch CPU RNGs seeded by `seed`, leaving the global RNG streams untouched.

    Only the CPU generator is seeded: torch.manual_seed also visits every accelerator generator, which costs more
    than a small image's augmentation, and transforms draw from the CPU generator. In a DataLoader worker the
    global streams serve nothing but these transforms, so they are not saved and restored (numpy's state alone
    takes ~140 us per image).
    """
    keep = torch.utils.data.get_worker_info() is None
    if keep:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return transform(img)
    finally:
        if keep:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


class ExampleStream(torch.utils.data.IterableDataset):
    """This process's examples as {"pixel_values", "label", "key", "ok"} ("ok" False for undecodable images).

    With `images` False nothing is decoded: examples carry only their content key and label, in the same order,
    and those outside `known_keys` (learned in an earlier pass) count as undecodable. hubtune.features uses this
    to replay an epoch from cached backbone features; with `views` N, epoch e is augmented as epoch e mod N.
    """

    def __init__(
        self, source: datasets.IterableDataset, transform: Callable, *, keep_val: bool | None, val_fraction: float,
        seed: int | None, shuffle_buffer: int,
    ) -> None:
        self.source = source
        self.transform = transform
        self.keep_val = keep_val
        self.val_fraction = val_fraction
        self.seed = seed  # None: no shuffling and deterministic (eval) transforms
        self.block = shuffle_buffer if seed is not None else 256
        self.epoch = 0
        self.images = True
        self.known_keys: frozenset[int] = frozenset()
        self.views: int | None = None
        self.draft: int | None = None  # JPEG draft decoding down to this size (hubtune.data.decode)
        self._resume: dict | None = None
        self._position: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.source.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, **(self._position or {"source": None, "block": 0, "offset": 0})}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self._resume = state

    def _process(self, example: dict) -> dict | None:
        data = example["data"]
        key = content_key(data)
        if self.keep_val is not None and (key / 2**64 < self.val_fraction) != self.keep_val:
            return None
        if not self.images:
            return {"pixel_values": None, "label": example["label"], "key": key, "ok": key in self.known_keys}
        img = decode(data, self.draft)
        if img is None:
            pixels = None
        elif self.seed is None:
            pixels = self.transform(img)
        else:
            view = self.epoch % self.views if self.views else self.epoch
            pixels = _seeded(self.transform, img, hash((self.seed, view, key)) % 2**63)
        return {"pixel_values": pixels, "label": example["label"], "key": key, "ok": pixels is not None}

    def __iter__(self) -> Iterator[dict]:
        resume, self._resume = self._resume, None
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker else 0
        # Split among DataLoader workers here rather than let datasets do it: datasets 5.2 loads a worker's saved
        # position into the unsplit stream before splitting it, which fails (IndexError) once a worker holds fewer
        # shards than the stream. Split this way, the saved and the restored layouts are the same.
        source = self.source
        if worker is not None and worker.num_workers > 1:
            source = split_dataset_by_node(source, rank=worker.id, world_size=worker.num_workers)
        if resume and resume["source"] is not None:
            source = copy.deepcopy(source)  # a loaded state must not leak into the next epoch's iteration
            source.load_state_dict(resume["source"])
        block_idx, offset = (resume["block"], resume["offset"]) if resume else (0, 0)
        start = resume["source"] if resume else None
        # .iter() reads the stream as given, without datasets' own per-worker split
        it = (dict(zip(batch, values)) for batch in source.iter(batch_size=1) for values in zip(*batch.values()))
        while True:
            items = list(islice(it, self.block))
            if not items:
                return
            order = range(len(items))
            if self.seed is not None:
                order = np.random.default_rng([self.seed, self.epoch, worker_id, block_idx]).permutation(len(items))
            for j in range(offset, len(items)):
                self._position = {"source": start, "block": block_idx, "offset": j + 1}
                out = self._process(items[order[j]])
                if out is not None:
                    yield out
            block_idx, offset = block_idx + 1, 0
            start = source.state_dict()


def collate(batch: list[dict]) -> dict[str, Any]:
    """Stack decodable examples; undecodable ones are dropped here and counted in `n_bad`.

    "pixel_values" is None when the batch has no decodable image or the stream decodes nothing (`images` False).
    """
    good = [ex for ex in batch if ex["ok"]]
    pixels = [ex["pixel_values"] for ex in good if ex["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack(pixels) if pixels else None,
        "labels": torch.tensor([ex["label"] for ex in good], dtype=torch.long),
        "keys": [ex["key"] for ex in good],
        "n_bad": len(batch) - len(good),
    }


def make_loader(stream: ExampleStream, batch_size: int, num_workers: int, pin_memory: bool) -> StatefulDataLoader:
    """A torchdata StatefulDataLoader: its state_dict() is the exact position after the last batch it returned."""
    # datasets hands whole shards to workers: more workers than shards would sit idle
    workers = min(num_workers, max(stream.source.num_shards, 1))
    return _Loader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, worker_init_fn=_ignore_stop_signals if workers else None,
    )


class _Loader(StatefulDataLoader):
    """A StatefulDataLoader whose iterators still open at exit are stopped (an exception or a `break` left them).

    Its workers ignore SIGTERM (see _ignore_stop_signals), and SIGTERM is how multiprocessing's exit hook stops
    daemonic children: without this, the interpreter would wait for them forever.
    """

    def __iter__(self) -> Iterator:
        it = super().__iter__()
        if self.num_workers:
            _OPEN_ITERATORS.add(it)
            # registered after multiprocessing's exit hook (the import registers it), so it runs before it
            importlib.import_module("multiprocessing.util")
            atexit.unregister(_stop_workers_at_exit)
            atexit.register(_stop_workers_at_exit)
        return it


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _stop_workers_at_exit() -> None:
    for it in list(_OPEN_ITERATORS):
        it._shutdown_workers()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C/SIGTERM to the main process, which saves a checkpoint before shutting them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
