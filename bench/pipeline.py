"""Benchmark 1: input pipeline images/s (decode + augment + collate, no model).

hubtune: the loaders train() builds (datasets streaming -> process_source -> ExampleStream -> StatefulDataLoader).
Comparison: the pipeline of transformers' examples/pytorch/image-classification/run_image_classification.py:
`load_dataset` (map-style, Arrow cache), a torchvision Compose applied per batch with `with_transform`, a
collate_fn that stacks, a torch DataLoader (shuffle for train). Its Compose gets the same ops, resolution and
augmentation strengths as hubtune's timm transforms (the example's own has no ColorJitter and no crop_pct), so
the two differ only in the pipeline around the transforms.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any, Callable

from bench import data as bench_data
from bench.common import Context, Timer, alternate, benchmark, row

SEED = 42


def timm_transforms(size: int) -> tuple[dict, Callable, Callable]:
    """hubtune's (data config, train, eval) transforms for resnet18 at `size` px, as train() builds them."""
    import timm

    from hubtune import model as model_lib

    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    cfg = model_lib.data_config(net, size)
    return (cfg, *model_lib.transforms(cfg))


def example_transforms(cfg: dict) -> tuple[Callable, Callable]:
    """The transformers example's Compose pipelines with the ops and strengths of timm's transforms."""
    from torchvision.transforms import (CenterCrop, ColorJitter, Compose, InterpolationMode, Normalize,
                                        RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor)

    size = cfg["input_size"][-1]
    interp = InterpolationMode(cfg["interpolation"])
    normalize = Normalize(mean=cfg["mean"], std=cfg["std"])
    train = Compose([RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interp),
                     RandomHorizontalFlip(), ColorJitter(0.4, 0.4, 0.4), ToTensor(), normalize])
    val = Compose([Resize(int(size / cfg["crop_pct"]), interpolation=interp), CenterCrop(size), ToTensor(), normalize])
    return train, val


def hubtune_loader(root: Any, tf: Callable, train: bool, batch: int, workers: int, keep_val: bool | None = None):
    """The loader train() builds for its train (shuffled, seeded augmentation) or val stream."""
    from hubtune import data, stream

    cfg = SimpleNamespace(dataset=str(root), dataset_revision=None, image_column=None, label_column=None,
                          val_fraction=0.1)
    train_src, _, info = data.open_splits(cfg)
    src = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED if train else None)
    ds = stream.ExampleStream(src, tf, keep_val=keep_val, val_fraction=0.1, seed=SEED if train else None,
                              shuffle_buffer=1000)
    return stream.make_loader(ds, batch, workers, pin_memory=False)


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


def images_per_s(make_loader: Callable[[], Any]) -> float:
    """Images/s over one full pass, from iter() (worker start included) to the last batch."""
    loader = make_loader()
    n = 0
    start = time.perf_counter()
    for batch in loader:
        n += len(batch["labels"])
    rate = n / (time.perf_counter() - start)
    del loader
    return rate


class no_stream_end_sleep:
    """Set datasets' end-of-stream sleep (SLEEP_TIME_ON_THREADS_SHUTDOWN) to 0 for a diagnostic pass."""

    def __enter__(self) -> None:
        import datasets

        self.old = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

    def __exit__(self, *exc: Any) -> None:
        import datasets

        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = self.old


def _per_example_us(fn: Callable[[], Any], n: int) -> float:
    with Timer() as t:
        fn()
    return round(t.s / n * 1e6, 1)


def diagnostics(root: Any, files: list[str], ds: Any, train_tf: Callable, eval_tf: Callable) -> dict:
    """Single-threaded per-example cost of each stage of both pipelines (microseconds per example)."""
    import datasets
    import torch

    from hubtune import data, stream

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-example costs without the intra-op thread pool (as in a loader worker)
    try:
        cfg = SimpleNamespace(dataset=str(root), dataset_revision=None, image_column=None, label_column=None,
                              val_fraction=0.1)
        out: dict[str, Any] = {}
        train_src, _, info = data.open_splits(cfg)
        n = len(ds)
        with no_stream_end_sleep():
            shuffled = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED)
            out["hubtune_read_shuffled_source"] = _per_example_us(lambda: sum(1 for _ in shuffled), n)
        plain = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=None)
        out["hubtune_read_unshuffled_source"] = _per_example_us(lambda: sum(1 for _ in plain), n)
        with Timer() as t:
            sum(1 for _ in data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED))
        out["hubtune_shuffled_source_pass_s"] = round(t.s, 2)
        out["datasets_end_of_stream_sleep_s"] = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
        raw = ds.cast_column("image", datasets.Image(decode=False))
        idx = list(range(n))
        random.Random(0).shuffle(idx)
        out["example_read_getitems_no_decode"] = _per_example_us(
            lambda: [raw.__getitems__(idx[i:i + 32]) for i in range(0, n, 32)], n)
        blobs = [ex["data"] for ex, _ in zip(plain, range(min(n, 150)))]
        k = len(blobs)
        out["hubtune_decode"] = _per_example_us(lambda: [data.decode(b) for b in blobs], k)
        feature = datasets.Image()
        out["datasets_decode_plus_convert"] = _per_example_us(
            lambda: [feature.decode_example({"bytes": b, "path": None}).convert("RGB") for b in blobs], k)
        out["content_key_blake2b"] = _per_example_us(lambda: [stream.content_key(b) for b in blobs], k)
        ident = lambda x: x  # noqa: E731
        out["hubtune_seeded_rng_fork"] = _per_example_us(lambda: [stream._seeded(ident, None, i) for i in range(k)],
                                                         k)
        out["torch_manual_seed"] = _per_example_us(lambda: [torch.manual_seed(i) for i in range(k)], k)
        out["cpu_generator_manual_seed"] = _per_example_us(
            lambda: [torch.default_generator.manual_seed(i) for i in range(k)], k)
        out["cpu_only_seeded_rng_fork"] = _per_example_us(lambda: [cpu_only_seeded(ident, None, i) for i in range(k)],
                                                          k)
        imgs = [data.decode(b) for b in blobs]
        out["eval_transform"] = _per_example_us(lambda: [eval_tf(im) for im in imgs], k)
        out["train_transform"] = _per_example_us(lambda: [train_tf(im) for im in imgs], k)
        torch.manual_seed(0)  # leave the global streams as a fresh run would have them
        return out
    finally:
        torch.set_num_threads(threads)


def cpu_only_seeded(transform: Callable, img: Any, seed: int) -> Any:
    """What stream._seeded costs when it seeds only the CPU generator (the product fix proposed in the report)."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    gen = torch.default_generator
    torch_state = gen.get_state()
    gen.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return transform(img)
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


@benchmark("pipeline")
def run(ctx: Context) -> dict:
    n, shards, size, batch = ctx.pick((64, 2, 64, 16), (640, 4, 224, 32))
    root = bench_data.dataset(n, shards)
    files = bench_data.files(root)
    cfg, train_tf, eval_tf = timm_transforms(size)
    ex_train_tf, ex_val_tf = example_transforms(cfg)
    with Timer() as t:
        ds = map_style(files)
    arrow_build_s = t.s
    for workers in () if ctx.quick else (0, 2):  # warm both (page cache, first-use imports) before timing
        images_per_s(lambda: hubtune_loader(root, eval_tf, False, batch, workers))
        images_per_s(lambda: example_loader(ds, ex_val_tf, False, batch, workers))
    rows, results = [], {}
    for split, goal in (("eval", 1.3), ("train", 1.0)):
        train = split == "train"
        tf, ex_tf = (train_tf, ex_train_tf) if train else (eval_tf, ex_val_tf)
        for workers in (0, 2):
            runners = {
                "hubtune": lambda: images_per_s(lambda: hubtune_loader(root, tf, train, batch, workers)),
                "example": lambda: images_per_s(lambda: example_loader(ds, ex_tf, train, batch, workers)),
            }
            if train and not ctx.quick:  # quick runs set the sleep to 0 anyway
                def no_sleep() -> float:
                    with no_stream_end_sleep():
                        return images_per_s(lambda: hubtune_loader(root, tf, train, batch, workers))

                runners["hubtune_no_end_sleep"] = no_sleep
            res = alternate(ctx.reps, runners, ctx.log, f"{split}/{workers}w")
            results[f"{split}_{workers}w"] = res
            rows.append(row(f"input pipeline, {split} transforms, {workers} workers", "img/s", res["hubtune"],
                            res["example"], comparison_name="transformers example (datasets + with_transform)",
                            goal=(">=", goal)))
            if "hubtune_no_end_sleep" in res:
                rows.append(row(f"input pipeline, train, {workers} workers, datasets end-of-stream sleep 0 (diagnostic)",
                                "img/s",
                                res["hubtune_no_end_sleep"], res["example"],
                                comparison_name="transformers example (datasets + with_transform)",
                                note="not a user setting: shows the cost of the fixed per-epoch sleep"))
    diag = diagnostics(root, files, ds, train_tf, eval_tf)
    return {
        "rows": rows,
        "params": {"images": n, "parquet_files": shards, "image_size": size, "batch_size": batch,
                   "model_transforms": "timm resnet18 pretrained_cfg", "reps": ctx.reps,
                   "data": bench_data.stats(root)},
        "details": {"results": results, "comparison_arrow_cache_build_s": round(arrow_build_s, 2),
                    "per_example_us_single_thread": diag},
    }
