"""Benchmark 1: input pipeline images/s (decode + augment + collate, no model).

hubtune: the loaders train() builds (datasets streaming -> process_source -> ExampleStream -> StatefulDataLoader).
Its transforms end in uint8 CHW tensors; train() turns each batch into normalized floats with hubtune.model.Normalize
on the device, which here is the CPU, so every hubtune batch goes through Normalize in the main process and its cost
is part of hubtune's images/s (the example's images come out of its workers already normalized).
Comparison: the pipeline of transformers' examples/pytorch/image-classification/run_image_classification.py:
`load_dataset` (map-style, Arrow cache), a torchvision Compose applied per batch with `with_transform`, a
collate_fn that stacks, a torch DataLoader (shuffle for train). Its Compose gets the same ops, resolution and
augmentation strengths as hubtune's timm transforms (the example's own has no ColorJitter and no crop_pct), so
the two differ only in the pipeline around the transforms.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from typing import Any, Callable

from bench import data as bench_data
from bench.common import Context, Timer, alternate, benchmark, row

SEED = 42


def timm_transforms(size: int) -> tuple[dict, Callable, Callable]:
    """hubtune's (data config, train, eval) transforms for resnet18 at `size` px, as train() builds them: uint8."""
    import timm

    from hubtune import model as model_lib

    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    cfg = model_lib.data_config(net, size)
    return (cfg, *model_lib.transforms(cfg))


def hubtune_prepare(cfg: dict) -> Callable:
    """What train() applies to every batch before the model: uint8 -> normalized float, here on the CPU."""
    import torch

    from hubtune import model as model_lib

    return model_lib.Normalize(cfg, torch.device("cpu"))


def example_transforms(cfg: dict) -> tuple[Callable, Callable]:
    """The transformers example's Compose pipelines with the ops and strengths of timm's transforms."""
    from torchvision.transforms import (
        CenterCrop,
        ColorJitter,
        Compose,
        InterpolationMode,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )

    size = cfg["input_size"][-1]
    interp = InterpolationMode(cfg["interpolation"])
    normalize = Normalize(mean=cfg["mean"], std=cfg["std"])
    train = Compose([RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interp),
                     RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4), ToTensor(), normalize])
    val = Compose([Resize(int(size / cfg["crop_pct"]), interpolation=interp), CenterCrop(size), ToTensor(), normalize])
    return train, val


def hubtune_loader(root: Any, tf: Callable, train: bool, batch: int, workers: int, keep_val: bool | None = None,
                   persistent: bool = False):
    """The loader train() builds for its train (shuffled, seeded augmentation) or val stream."""
    from hubtune import data, seeding, stream

    train_src, _, info = data.open_splits(data.DatasetSource(str(root), val_fraction=0.1))
    src = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED if train else None)
    ds = stream.ExampleStream(src, tf, keep_val=keep_val, val_fraction=0.1, seed=SEED if train else None,
                              shuffle_buffer=1000)
    return stream.make_loader(ds, batch, workers, pin_memory=False, persistent_workers=persistent)


def map_style(files: list[str]):
    """The example's `load_dataset(...)` (non-streaming: builds the Arrow cache once)."""
    import datasets

    return datasets.load_dataset("parquet", data_files={"train": files}, split="train")


def example_loader(ds: Any, tf: Callable, train: bool, batch: int, workers: int):
    """run_image_classification.py: set_transform over the image column, stacking collate_fn, a DataLoader."""
    import torch

    def transforms(example_batch: dict) -> dict:
        example_batch["pixel_values"] = [tf(img.convert("RGB")) for img in example_batch["image"]]
        return example_batch

    def collate_fn(examples: list[dict]) -> dict:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    return torch.utils.data.DataLoader(ds.with_transform(transforms), batch_size=batch, shuffle=train,
                                       num_workers=workers, collate_fn=collate_fn)


def images_per_s(make_loader: Callable[[], Any], prepare: Callable | None = None) -> float:
    """Images/s over one full pass, from iter() (worker start included) to the last batch ready for a model.

    `prepare` (hubtune's per-batch Normalize) runs on every batch's pixel_values inside the timing.
    """
    loader = make_loader()
    n = 0
    start = time.perf_counter()
    for batch in loader:
        if prepare is not None:  # (hubtune's loader: stream.Batch records; the example's: dicts)
            prepare(batch.pixel_values)
        n += len(batch["labels"] if isinstance(batch, dict) else batch.labels)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


def epochs_images_per_s(loader: Any, epochs: int, prepare: Callable) -> float:
    """Images/s over `epochs` consecutive passes of one loader (set_epoch before each, as train() does)."""
    n = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            prepare(batch.pixel_values)
            n += len(batch.labels)
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


@contextmanager
def stream_end_sleeps() -> Any:
    """Count datasets' end-of-stream sleeps (SLEEP_TIME_ON_THREADS_SHUTDOWN) in this process; they still happen."""
    import datasets.iterable_dataset as ids

    calls: list[float] = []
    real = ids.time

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            calls.append(seconds)
            real.sleep(seconds)

    ids.time = Recording()
    try:
        yield calls
    finally:
        ids.time = real


def _per_example_us(fn: Callable[[], Any], n: int, repeat: int = 3) -> float:
    """Microseconds per example of `fn` (which handles `n` examples): the best of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        with Timer() as t:
            fn()
        best = min(best, t.s)
    return round(best / n * 1e6, 1)


def diagnostics(root: Any, ds: Any, cfg: dict, tfs: dict[str, Callable]) -> dict:
    """Single-threaded cost of each stage of both pipelines, microseconds per example (batches of 32; best of 3).

    hubtune: read the raw bytes (shuffled and not), content key, decode, per-example seeding, uint8 transforms,
    collate, Normalize per batch. Example: read without decoding, decode + convert, float transforms, collate.
    Also whether a shuffled pass of hubtune's source still ends in datasets' end-of-stream sleep (it should not).
    """
    import datasets
    import torch

    from hubtune import data, seeding, stream

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-example costs without the intra-op thread pool (as in a loader worker)
    try:
        out: dict[str, Any] = {}
        train_src, _, info = data.open_splits(data.DatasetSource(str(root), val_fraction=0.1))
        n = len(ds)
        with stream_end_sleeps() as sleeps, Timer() as t:
            shuffled = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED)
            read = sum(1 for _ in shuffled)
        out["hubtune_read_shuffled_source"] = round(t.s / read * 1e6, 1)
        out["hubtune_shuffled_source_pass_s"] = round(t.s, 3)
        out["hubtune_stream_end_sleeps_per_pass"] = len(sleeps)
        plain = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=None)
        out["hubtune_read_unshuffled_source"] = _per_example_us(lambda: sum(1 for _ in plain), n, repeat=1)
        raw = ds.cast_column("image", datasets.Image(decode=False))
        idx = list(range(n))
        random.Random(0).shuffle(idx)
        out["example_read_getitems_no_decode"] = _per_example_us(
            lambda: [raw.__getitems__(idx[i:i + 32]) for i in range(0, n, 32)], n, repeat=1)
        blobs = [ex["data"] for ex, _ in zip(plain, range(min(n, 160)))]
        k = len(blobs) // 32 * 32
        blobs = blobs[:k]
        out["content_key_blake2b"] = _per_example_us(lambda: [stream.content_key(b) for b in blobs], k)
        out["hubtune_decode"] = _per_example_us(lambda: [data.decode(b) for b in blobs], k)
        feature = datasets.Image()
        out["example_decode_plus_convert"] = _per_example_us(
            lambda: [feature.decode_example({"bytes": b, "path": None}).convert("RGB") for b in blobs], k)
        ident = lambda x: x  # noqa: E731
        out["hubtune_per_example_seeding"] = _per_example_us(
            lambda: [seeding.seeded(ident, None, i) for i in range(k)], k)
        imgs = [data.decode(b) for b in blobs]
        for name, tf in tfs.items():
            out[name] = _per_example_us(lambda: [tf(im) for im in imgs], k)
        hub_px = [tfs["hubtune_eval_transform_uint8"](im) for im in imgs]
        ex_px = [tfs["example_eval_transform_float"](im) for im in imgs]
        examples = [{"pixel_values": x, "label": 0, "key": 0, "ok": True} for x in hub_px]
        batches = [stream.collate(examples[i:i + 32]) for i in range(0, k, 32)]
        out["hubtune_collate_uint8"] = _per_example_us(
            lambda: [stream.collate(examples[i:i + 32]) for i in range(0, k, 32)], k)
        prepare = hubtune_prepare(cfg)
        out["hubtune_normalize_per_batch"] = _per_example_us(lambda: [prepare(b.pixel_values) for b in batches],
                                                             k)
        out["example_collate_float"] = _per_example_us(
            lambda: [torch.stack(ex_px[i:i + 32]) for i in range(0, k, 32)], k)
        out["examples_timed"] = k
        torch.manual_seed(0)  # leave the global streams as a fresh run would have them
        return out
    finally:
        torch.set_num_threads(threads)


@benchmark("pipeline")
def run(ctx: Context) -> dict:
    n, shards, size, batch = ctx.pick((64, 2, 64, 16), (512, 4, 224, 32))
    root = bench_data.dataset(n, shards)
    files = bench_data.files(root)
    cfg, train_tf, eval_tf = timm_transforms(size)
    ex_train_tf, ex_val_tf = example_transforms(cfg)
    prepare = hubtune_prepare(cfg)
    with Timer() as t:
        ds = map_style(files)
    arrow_build_s = t.s
    for workers in () if ctx.quick else (0, 2):  # warm both (page cache, first-use imports) before timing
        images_per_s(lambda: hubtune_loader(root, eval_tf, False, batch, workers), prepare)
        images_per_s(lambda: example_loader(ds, ex_val_tf, False, batch, workers))
    rows, results = [], {}
    for split, goal in (("eval", 1.3), ("train", 1.0)):
        train = split == "train"
        tf, ex_tf = (train_tf, ex_train_tf) if train else (eval_tf, ex_val_tf)
        for workers in (0, 2):
            # a pass takes ~2 s and this machine's noise is +-15%: more repetitions than the default
            res = alternate(ctx.reps if ctx.quick else max(ctx.reps, 7), {
                "hubtune": lambda: images_per_s(lambda: hubtune_loader(root, tf, train, batch, workers), prepare),
                "example": lambda: images_per_s(lambda: example_loader(ds, ex_tf, train, batch, workers)),
            }, ctx.log, f"{split}/{workers}w")
            results[f"{split}_{workers}w"] = res
            rows.append(row(f"input pipeline, {split} transforms, {workers} workers", "img/s", res["hubtune"],
                            res["example"], comparison_name="transformers example (datasets + with_transform)",
                            goal=(">=", goal), note="hubtune: uint8 images, Normalize per batch in the main process"))
    # persistent workers (train()'s default) against workers started afresh for every pass, over several epochs
    epochs = 3
    res = alternate(ctx.reps if ctx.quick else max(ctx.reps, 7), {
        "persistent": lambda: epochs_images_per_s(hubtune_loader(root, train_tf, True, batch, 2, persistent=True),
                                                  epochs, prepare),
        "fresh": lambda: epochs_images_per_s(hubtune_loader(root, train_tf, True, batch, 2), epochs, prepare),
    }, ctx.log, f"train/2w/{epochs} epochs")
    results[f"train_2w_{epochs}_epochs"] = res
    rows.append(row(f"input pipeline, train transforms, 2 workers, {epochs} epochs: persistent workers", "img/s",
                    res["persistent"], res["fresh"], comparison_name="hubtune with workers started for each epoch",
                    note="--persistent-workers (default) vs --no-persistent-workers"))
    diag = diagnostics(root, ds, cfg, {"hubtune_train_transform_uint8": train_tf,
                                       "hubtune_eval_transform_uint8": eval_tf,
                                       "example_train_transform_float": ex_train_tf,
                                       "example_eval_transform_float": ex_val_tf})
    stages = ("hubtune_decode", "hubtune_train_transform_uint8", "hubtune_eval_transform_uint8",
              "hubtune_normalize_per_batch", "example_decode_plus_convert", "example_train_transform_float",
              "example_eval_transform_float")
    sleeps = diag["hubtune_stream_end_sleeps_per_pass"]
    summary = ("single-thread cost per example (µs): " + ", ".join(f"{k} {diag[k]:,.0f}" for k in stages)
               + f"; datasets end-of-stream sleeps in a shuffled pass of hubtune's source: {sleeps}")
    return {
        "rows": rows,
        "summary": summary,
        "params": {"images": n, "parquet_files": shards, "image_size": size, "batch_size": batch,
                   "model_transforms": "timm resnet18 pretrained_cfg", "reps": ctx.reps,
                   "hubtune_batch_step": "hubtune.model.Normalize on the CPU, in the timed loop",
                   "data": bench_data.stats(root)},
        "details": {"results": results, "comparison_arrow_cache_build_s": round(arrow_build_s, 2),
                    "per_example_us_single_thread": diag},
    }
