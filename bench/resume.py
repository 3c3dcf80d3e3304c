"""Benchmark 4: resume cost, time to the first batch when resuming at 10% vs 90% of an epoch.

hubtune: the train loader's state is taken after 10% / 90% of the epoch's batches (untimed), then a fresh loader
over fresh streams gets `load_state_dict(state)` and the time to its first batch is measured: the stream restores
datasets' position at the start of the current shuffle block and re-reads at most that block's raw rows.
Comparison: skip-by-reading, the way Accelerate resumes an iterable loader without a state
(`accelerate.skip_first_batches`): a fresh loader that produces and discards the first N batches.

Each epoch spans many shuffle blocks (the default --shuffle-buffer 1000 is 1/23 of the 23k-image Cats vs Dogs
epoch; here a block is 1/16 of a worker's share), so 10% and 90% fall in different blocks and neither in the last
one: reaching the end of datasets' shuffled stream costs a fixed sleep (see the pipeline benchmark).
With 2 workers the dataset has at least 10 parquet row groups per worker: with fewer, restoring a multi-worker
state fails inside datasets (the last row shows it).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

from bench import data as bench_data
from bench.common import Context, alternate, benchmark, row

SEED = 42


def loader(root: Any, tf: Callable, batch_size: int, workers: int, block: int, stateful: bool = True) -> Any:
    """hubtune's train loader (StatefulDataLoader), or a plain torch DataLoader over the same stream."""
    import torch

    from hubtune import data, stream
    from hubtune.config import TrainConfig

    cfg = TrainConfig(dataset=str(root))
    train_src, _, info = data.open_splits(cfg)
    ds = stream.ExampleStream(data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED), tf,
                              keep_val=False, val_fraction=cfg.val_fraction, seed=SEED, shuffle_buffer=block)
    if stateful:
        return stream.make_loader(ds, batch_size, workers, pin_memory=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(workers, ds.source.num_shards),
                                       collate_fn=stream.collate)


def take(ld: Any, batches: int) -> float:
    """Draw `batches` batches, then stop the loader's workers, also when a batch raises; when the last came.

    An abandoned iterator keeps its workers until garbage collection, and one whose worker raised is not collected:
    hubtune's workers ignore SIGTERM, so a leftover worker would hang the interpreter at exit.
    """
    it = iter(ld)
    try:
        for _ in range(batches):
            next(it)
        return time.perf_counter()
    finally:
        shutdown = getattr(it, "_shutdown_workers", None) or getattr(getattr(ld, "_iterator", None),
                                                                      "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif hasattr(it, "close"):
            it.close()


def state_after(make: Callable[[], Any], batches: int) -> dict:
    """The loader state after `batches` batches (what a checkpoint stores)."""
    ld = make()
    it = iter(ld)
    try:
        for _ in range(batches):
            next(it)
        return copy.deepcopy(ld.state_dict())
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def first_batch_after_restore(make: Callable[[], Any], state: dict) -> float:
    start = time.perf_counter()
    ld = make()
    ld.load_state_dict(state)
    return take(ld, 1) - start


def first_batch_after_skip(make: Callable[[], Any], batches: int) -> float:
    from accelerate import skip_first_batches

    start = time.perf_counter()
    return take(skip_first_batches(make(), batches), 1) - start


def case(ctx: Context, root: Any, tf: Callable, batch_size: int, workers: int, skip: bool) -> tuple[dict, dict]:
    """Median times to the first batch at 10% and 90% (hubtune, and skip-by-reading when `skip`)."""
    import torch

    from bench.pipeline import no_stream_end_sleep

    per_worker = sum(1 for _ in open_rows(root)) // max(workers, 1)
    block = max(per_worker // 16, 8)
    cheap = lambda img: torch.zeros(1)  # noqa: E731  (positions do not depend on the transform)
    with no_stream_end_sleep():  # counting and taking the states is not what is measured
        total = sum(1 for _ in loader(root, cheap, batch_size, workers, block))
        at = {p: max(1, round(total * p / 100)) for p in (10, 90)}
        states = {p: state_after(lambda: loader(root, cheap, batch_size, workers, block), k) for p, k in at.items()}
    stateful = lambda: loader(root, tf, batch_size, workers, block)  # noqa: E731
    runners = {"hubtune_10": lambda: first_batch_after_restore(stateful, states[10]),
               "hubtune_90": lambda: first_batch_after_restore(stateful, states[90])}
    if skip:
        plain = lambda: loader(root, tf, batch_size, workers, block, stateful=False)  # noqa: E731
        runners |= {"skip_10": lambda: first_batch_after_skip(plain, at[10]),
                    "skip_90": lambda: first_batch_after_skip(plain, at[90])}
    res = alternate(ctx.reps, runners, ctx.log, f"{workers}w")
    return res, {"epoch_batches": total, "resume_after_batches": at, "shuffle_buffer": block,
                 "row_groups": row_groups(root)}


def open_rows(root: Any) -> Any:
    import pyarrow.parquet as pq

    for f in bench_data.files(root):
        yield from range(pq.ParquetFile(f).metadata.num_rows)


def row_groups(root: Any) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_row_groups for f in bench_data.files(root))


def few_row_groups_probe(root: Any, tf: Callable, batch_size: int) -> dict:
    """Restore a 2-worker state on a dataset with < 10 row groups per worker; report what happens."""
    make = lambda: loader(root, tf, batch_size, 2, 8)  # noqa: E731
    from bench.pipeline import no_stream_end_sleep

    with no_stream_end_sleep():
        state = state_after(make, 6)  # past each worker's first shuffle block: the state holds datasets' position
        try:
            first_batch_after_restore(make, state)
            return {"ok": True, "row_groups": row_groups(root)}
        except Exception as err:  # noqa: BLE001  (the failure is the finding)
            return {"ok": False, "row_groups": row_groups(root), "error": f"{type(err).__name__}: "
                    f"{str(err).strip().splitlines()[-1][:200]}"}


@benchmark("resume")
def run(ctx: Context) -> dict:
    from bench.pipeline import timm_transforms

    image_size, batch_size = ctx.pick((64, 8), (160, 32))
    _, train_tf, _ = timm_transforms(image_size)
    zero = bench_data.dataset(*ctx.pick((128, 2), (800, 4)))
    cases = [(0, zero, True)]
    if not ctx.quick:  # quick: the 2-worker timing needs a dataset with >= 20 row groups; the probe still runs
        cases.append((2, bench_data.dataset(2400, 8), False))
    rows, results, params = [], {}, {}
    for workers, root, skip in cases:
        res, info = case(ctx, root, train_tf, batch_size, workers, skip)
        results[f"{workers}_workers"], params[f"{workers}_workers"] = res, {"images": sum(1 for _ in open_rows(root)),
                                                                            **info}
        rows.append(row(f"resume, {workers} workers: time to first batch at 90% / at 10% of the epoch", "s",
                        res["hubtune_90"], res["hubtune_10"], comparison_name="hubtune at 10%",
                        ratio_of="90% / 10%", goal=("<=", 1.2), higher_is_better=False))
        if skip:
            rows.append(row(f"resume, {workers} workers: time to first batch at 90%, vs skip-by-reading", "s",
                            res["hubtune_90"], res["skip_90"],
                            comparison_name="accelerate.skip_first_batches (reads and discards)",
                            higher_is_better=False,
                            note=f"skip-by-reading is {res['skip_90']['median'] / res['skip_10']['median']:.1f}x "
                                 "slower at 90% than at 10%"))
    probe = few_row_groups_probe(zero, train_tf, batch_size)
    rows.append(row(f"resume, 2 workers, {probe['row_groups']} row groups (< 10 per worker)", "s", None,
                    status="works" if probe["ok"] else "fails",
                    note="" if probe["ok"] else f"restoring the loader state raises {probe['error']}"))
    return {"rows": rows,
            "params": {"image_size": image_size, "batch_size": batch_size, "transforms": "train (seeded augmentation)",
                       "reps": ctx.reps, **params},
            "details": {"results": results, "few_row_groups_probe": probe}}
