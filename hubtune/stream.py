"""The per-process example stream: block shuffle, hash split, decode, seeded augmentation; resumable exactly.

datasets' own shuffle buffer is not restorable (its state_dict drops the buffer content, so a resumed epoch
would skip what was in it). Here the stream is cut into blocks of `shuffle_buffer` examples, each permuted by
a generator seeded from (seed, epoch, worker, block). A position is (datasets' state at the block start, block,
offset): resuming re-reads at most one block, however far into the epoch the run was. Augmentation is seeded
per example from (seed, epoch, image content), so it does not depend on worker count, process count or resume.

With draw rates (--balanced-sampling, see hubtune.balance), each example of a block is drawn `copies` times, a
number decided by (seed, epoch, image content) alone, and the block's list of draws is permuted: the offset of a
position indexes that list, so a checkpoint taken between two copies of an image resumes between them.
"""

from __future__ import annotations

import atexit
import copy
import functools
import hashlib
import importlib
import os
import signal
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from hubtune import device_decode
from hubtune.data import decode
from hubtune.seeding import seeded

# torchdata 0.11 calls a deprecated torch API on every iterator; nothing for users to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def content_key(data: bytes) -> int:
    """A stable 64-bit key of the image bytes (val membership and augmentation seeds)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"hubtune-val").digest(), "big")


def copies(rate: float, seed: int, epoch: int, key: int) -> int:
    """How often the image with content key `key` is drawn in `epoch` at draw rate `rate`: the whole part of the
    rate, plus one with the probability of its fraction. Decided by (seed, epoch, key) alone, so the same in every
    process, worker count and resume, and different from epoch to epoch."""
    whole, fraction = divmod(rate, 1.0)
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8, person=b"hubtune-draw").digest()
    return int(whole) + (int.from_bytes(digest, "big") / 2**64 < fraction)


def in_val(key: int, fraction: float) -> bool:
    """Whether the image with this content key is held out for validation: the same in every run, process count
    and shuffle order. Each image is cut off independently, so a class keeps `fraction` of its examples only on
    average (a small class can get none); identical images always land on the same side."""
    return key / 2**64 < fraction


@dataclass(frozen=True)
class ReadSettings:
    """How a run's streams shuffle, decode and batch: --seed (training order and augmentation), --shuffle-buffer,
    --jpeg-draft (validation), --batch-size, --num-workers, --persistent-workers."""

    seed: int
    shuffle_buffer: int
    jpeg_draft: bool
    batch_size: int
    num_workers: int
    persistent_workers: bool


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
        # in shared memory, like datasets' own epoch: persistent DataLoader workers see set_epoch from the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.images = True
        self.known_keys: frozenset[int] = frozenset()
        self.views: int | None = None
        self.draft: int | None = None  # JPEG draft decoding down to this size (hubtune.data.decode)
        self.planned = False  # --decode-device cuda: JPEGs leave the workers as bytes and a plan (device_decode)
        # --balanced-sampling: expected draws per epoch of an example of each class (by label); None: each once
        self.draw_rates: tuple[float, ...] | None = None
        self._resume: dict | None = None
        self._position: dict | None = None

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)
        self.source.set_epoch(epoch)

    def pass_settings(self) -> tuple:
        """What a worker copies when it starts and reads in every pass: a persistent worker serves while it holds.

        The epoch is not among them: it lives in shared memory.
        """
        return self.images, self.known_keys, self.views, self.draft, self.planned, self.draw_rates

    def labels(self) -> Generator[int, None, None]:
        """The labels of this process's examples in stream order, read without decoding (a pass over the keys), each
        example once (draw rates are not applied)."""
        saved = self.images, self.known_keys, self.draw_rates
        self.images, self.known_keys, self.draw_rates = False, frozenset(), None
        try:
            for example in self:
                yield example["label"]
        finally:
            self.images, self.known_keys, self.draw_rates = saved

    def state_dict(self) -> dict:
        # a pass's position carries its own epoch: a worker may still be finishing one when the next is set
        return self._position or {"epoch": self.epoch, "source": None, "block": 0, "offset": 0}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self._resume = state

    def _process(self, example: dict, view: int, repeat: int = 0, key: int | None = None) -> dict | None:
        data = example["data"]
        key = content_key(data) if key is None else key  # (given by _draws, which hashed the bytes already)
        if self.keep_val is not None and in_val(key, self.val_fraction) != self.keep_val:
            return None
        if not self.images:
            return {"pixel_values": None, "label": example["label"], "key": key, "ok": key in self.known_keys}
        # a repeated image (--balanced-sampling) is augmented differently each time; its first copy as without it
        seed = None if self.seed is None else hash((self.seed, view, key, *((repeat,) if repeat else ()))) % 2**63
        if self.planned:
            planned = device_decode.plan(data, self.transform, seed)
            if planned is not None:
                return {"pixel_values": planned, "label": example["label"], "key": key, "ok": True}
        img = decode(data, self.draft)
        if img is None:
            pixels = None
        elif seed is None:
            pixels = self.transform(img)
        else:
            pixels = seeded(self.transform, img, seed)
        out = {"pixel_values": pixels, "label": example["label"], "key": key, "ok": pixels is not None}
        if self.planned:
            out["fallback"] = True  # decoded here although the device was asked to
        return out

    def __iter__(self) -> Iterator[dict]:
        # Eager, not a generator: a (persistent) worker reports its state as soon as the pass begins, before it
        # yields anything, and that state must be this pass's start, not where the previous pass ended.
        resume, self._resume = self._resume, None
        self._position = None
        return self._examples(resume, self.epoch)

    def _examples(self, resume: dict | None, epoch: int) -> Iterator[dict]:
        view = epoch % self.views if self.views else epoch
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
            draws = self._draws(items, epoch)
            order: range | np.ndarray = range(len(draws))
            if self.seed is not None:
                order = np.random.default_rng([self.seed, epoch, worker_id, block_idx]).permutation(len(draws))
            for j in range(offset, len(draws)):
                self._position = {"epoch": epoch, "source": start, "block": block_idx, "offset": j + 1}
                index, repeat, key = draws[order[j]]
                out = self._process(items[index], view, repeat, key)
                if out is not None:
                    yield out
            block_idx, offset = block_idx + 1, 0
            start = source.state_dict()

    def _draws(self, items: list[dict], epoch: int) -> list[tuple[int, int, int | None]]:
        """(item index, repeat number, content key or None) of every draw from a block, in item order: each item once
        without draw rates; with them, `copies` of each training example (none of one held out for validation)."""
        if self.draw_rates is None or self.seed is None:  # never for validation or evaluation streams
            return [(i, 0, None) for i in range(len(items))]
        draws: list[tuple[int, int, int | None]] = []
        for i, example in enumerate(items):
            key = content_key(example["data"])
            if self.keep_val is not None and in_val(key, self.val_fraction) != self.keep_val:
                continue
            draws += [(i, c, key) for c in range(copies(self.draw_rates[example["label"]], self.seed, epoch, key))]
        return draws


@dataclass(frozen=True)
class Batch:
    """One loader batch of a stream: the decodable examples' uint8 images, labels and content keys, and how many
    examples could not be decoded.

    It is built by `collate` in the loader workers and crosses to the training process pickled. `pixel_values` is
    None when no image decoded, when the stream decodes nothing (`images` False: the feature cache replays), and with
    --decode-device until device_decode.BatchDecoder turns `parts` into pixels.
    """

    pixel_values: torch.Tensor | None
    labels: torch.Tensor
    keys: list[int]
    n_bad: int
    # --decode-device: DecodePlans and CPU-decoded images, in order, and how many of them the workers decoded
    parts: list[Any] | None = None
    n_fallback: int = 0
    # set by the training loop (hubtune.train.synced_batches): the loader position and decode counters after this
    # batch (what a checkpoint saved after it restores), and the seconds the loop waited for it
    position: dict[str, Any] = field(default_factory=dict)
    waited: float = 0.0

    def images(self) -> torch.Tensor:
        """The uint8 images, for a batch that has some (loops pass over batches without decodable examples)."""
        assert self.pixel_values is not None, "a batch without images (none decoded, or the feature cache replays)"
        return self.pixel_values

    def pin_memory(self) -> Batch:
        """The batch in pinned memory (what the loader's pin_memory thread calls, for faster copies to the GPU)."""
        parts = None if self.parts is None else [p.pin_memory() if isinstance(p, torch.Tensor) else p
                                                 for p in self.parts]
        pixels = None if self.pixel_values is None else self.pixel_values.pin_memory()
        return replace(self, pixel_values=pixels, labels=self.labels.pin_memory(), parts=parts)


def collate(batch: list[dict]) -> Batch:
    """Stack decodable examples; undecodable ones are dropped here and counted in `n_bad`."""
    good = [ex for ex in batch if ex["ok"]]
    pixels = [ex["pixel_values"] for ex in good if ex["pixel_values"] is not None]
    labels = torch.tensor([ex["label"] for ex in good], dtype=torch.long)
    keys, n_bad = [ex["key"] for ex in good], len(batch) - len(good)
    if any("fallback" in ex or isinstance(ex["pixel_values"], device_decode.DecodePlan) for ex in batch):
        # --decode-device: plans and CPU-decoded images in order; device_decode.BatchDecoder makes the pixels
        return Batch(None, labels, keys, n_bad, parts=pixels, n_fallback=sum(ex.get("fallback", False) for ex in good))
    return Batch(torch.stack(pixels) if pixels else None, labels, keys, n_bad)


def make_loader(stream: ExampleStream, batch_size: int, num_workers: int, pin_memory: bool,
                persistent_workers: bool = False) -> StatefulDataLoader:
    """A torchdata StatefulDataLoader: its state_dict() is the exact position after the last batch it returned.

    With `persistent_workers`, workers serve pass after pass; they are started afresh only when the stream's
    `pass_settings()` changed since they started, or when a position is loaded (as StatefulDataLoader does).
    """
    # datasets hands whole shards to workers: more workers than shards would sit idle
    workers = min(num_workers, max(stream.source.num_shards, 1))
    return _Loader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=persistent_workers and workers > 0,
        # its own generator: each new iterator draws its workers' base seed from it, and a draw from the global
        # stream would make a resumed run's dropout diverge (a resume starts one more iterator mid-epoch)
        generator=torch.Generator().manual_seed(stream.seed or 0),
    )


class _Loader(StatefulDataLoader):
    """A StatefulDataLoader whose workers leave stop signals to the main process until it releases them, and whose
    persistent workers are replaced when what they copied from the stream is out of date.

    Workers ignore Ctrl-C and SIGTERM (see _worker_signals) until their iterator is collected or the interpreter
    exits: SIGTERM is how both torch and multiprocessing's exit hook stop workers that a lost message did not.
    """

    _iterator: Any  # StatefulDataLoader's iterator in use, or None (torchdata ships no type hints)

    def _get_iterator(self) -> Any:
        self._workers_settings = self.dataset.pass_settings()  # what the workers about to start copy
        if not self.num_workers:
            return super()._get_iterator()
        release = (self.multiprocessing_context or torch.multiprocessing).Event()
        self.worker_init_fn = functools.partial(_worker_signals, release)
        it = super()._get_iterator()
        # Collected in a reference cycle, an iterator's index queues would be closed (their own finalizers run first)
        # before its __del__ sends the workers their stop request, which would be lost. Held by this finalizer, the
        # queues stay open until then; and should a request be lost anyway, the SIGTERM that follows ends them.
        weakref.finalize(it, _release, release, it._index_queues)
        it.release_workers = release.set  # at exit; a collected iterator's workers were released by the finalizer
        _OPEN_ITERATORS.add(it)
        # registered after multiprocessing's exit hook (the import registers it), so it runs before it
        importlib.import_module("multiprocessing.util")
        atexit.unregister(_stop_workers_at_exit)
        atexit.register(_stop_workers_at_exit)
        return it

    decode: Callable[[Batch], Batch] | None = None  # --decode-device: device_decode.BatchDecoder

    def __iter__(self) -> Iterator:
        # (an iterator that state_dict() has just started may hold a loaded position: it is kept)
        if (self.persistent_workers and self._iterator is not None and not self._initial_iter_for_state_dict
                and self.dataset.pass_settings() != self._workers_settings):
            self._iterator._shutdown_workers()
            self._iterator = None
        it = super().__iter__()
        return it if self.decode is None else map(self.decode, it)


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _stop_workers_at_exit() -> None:
    """Stop the workers of iterators still open at exit (an exception or a `break` left them, or they persist)."""
    for it in list(_OPEN_ITERATORS):
        it.release_workers()
        it._shutdown_workers()


def _release(release: Any, index_queues: list) -> None:
    release.set()


def _worker_signals(release: Any, worker_id: int) -> None:
    """Workers leave Ctrl-C/SIGTERM to the main process, which saves a checkpoint before shutting them down.

    A SIGTERM still ends a worker once `release` is set: its iterator is gone or the interpreter is exiting.
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        if release.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
