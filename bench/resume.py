"""Benchmark 4: resume cost, time to the first batch when resuming at 10% vs 90% of an epoch.

hubtune: the train loader's state is taken after 10% / 90% of the epoch's batches (untimed), then a fresh loader
over fresh streams gets `load_state_dict(state)` and the time to its first batch, normalized as train() does
(hubtune.model.Normalize), is measured: the stream restores datasets' position at the start of the current
shuffle block and re-reads at most that block's raw rows.
Comparison: skip-by-reading, the way Accelerate resumes an iterable loader without a state
(`accelerate.skip_first_batches`): a fresh loader over the same stream that produces and discards the first N
batches, then its first kept batch normalized the same way.

Each epoch spans many shuffle blocks (the default --shuffle-buffer 1000 is 1/23 of the 23k-image Cats vs Dogs
epoch; here a block is 1/16 of a worker's share), so 10% and 90% fall in different blocks.
With 2 workers the dataset has at least 10 parquet row groups per worker: with fewer, restoring a multi-worker
state fails inside datasets (the last row shows it).
"""

from __future__ import annotations

import copy
import gc
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
    from hubtune.job import dataset_source

    cfg = TrainConfig(dataset=str(root))
    train_src, _, info = data.open_splits(dataset_source(cfg))
    ds = stream.ExampleStream(data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=SEED), tf,
                              keep_val=False, val_fraction=cfg.val_fraction, seed=SEED, shuffle_buffer=block)
    if stateful:
        return stream.make_loader(ds, batch_size, workers, pin_memory=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(workers, ds.source.num_shards),
                                       collate_fn=stream.collate)


def take(ld: Any, batches: int, state: bool = False, prepare: Callable | None = None) -> Any:
    """Draw `batches` batches; return when the last came, through `prepare` (or the loader state after it).

    The iterator is then closed on the spot, also when a batch raised: an abandoned iterator keeps its workers
    until garbage collection, and they would compete with the next timed run for the CPUs.
    """
    it = iter(ld)
    try:
        for _ in range(batches):
            batch = next(it)
        if state:
            return copy.deepcopy(ld.state_dict())
        if prepare is not None:
            prepare(batch.pixel_values)
        return time.perf_counter()
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if hasattr(ld, "_iterator"):
            ld._iterator = None
        it = None
        gc.collect()


def state_after(make: Callable[[], Any], batches: int) -> dict:
    """The loader state after `batches` batches (what a checkpoint stores)."""
    return take(make(), batches, state=True)


def first_batch_after_restore(make: Callable[[], Any], state: dict, prepare: Callable) -> float:
    start = time.perf_counter()
    ld = make()
    ld.load_state_dict(state)
    return take(ld, 1, prepare=prepare) - start


def first_batch_after_skip(make: Callable[[], Any], batches: int, prepare: Callable) -> float:
    from accelerate import skip_first_batches

    start = time.perf_counter()
    return take(skip_first_batches(make(), batches), 1, prepare=prepare) - start


def case(ctx: Context, root: Any, tf: Callable, prepare: Callable, batch_size: int, workers: int,
         skip: bool) -> tuple[dict, dict]:
    """Median times to the first batch at 10% and 90% (hubtune, and skip-by-reading when `skip`)."""
    import torch

    per_worker = sum(1 for _ in open_rows(root)) // max(workers, 1)
    block = max(per_worker // 16, 8)
    cheap = lambda img: torch.zeros(1)  # noqa: E731  (positions do not depend on the transform)
    total = sum(1 for _ in loader(root, cheap, batch_size, workers, block))  # untimed: counting, taking states
    at = {p: max(1, round(total * p / 100)) for p in (10, 90)}
    states = {p: state_after(lambda: loader(root, cheap, batch_size, workers, block), k) for p, k in at.items()}
    stateful = lambda: loader(root, tf, batch_size, workers, block)  # noqa: E731
    runners = {"hubtune_10": lambda: first_batch_after_restore(stateful, states[10], prepare),
               "hubtune_90": lambda: first_batch_after_restore(stateful, states[90], prepare)}
    if skip:
        plain = lambda: loader(root, tf, batch_size, workers, block, stateful=False)  # noqa: E731
        runners |= {"skip_10": lambda: first_batch_after_skip(plain, at[10], prepare),
                    "skip_90": lambda: first_batch_after_skip(plain, at[90], prepare)}
    # a restore takes ~0.15 s and this machine's noise is of that order: more repetitions than the default
    res = alternate(ctx.reps if ctx.quick else max(ctx.reps, 9), runners, ctx.log, f"{workers}w")
    return res, {"epoch_batches": total, "resume_after_batches": at, "shuffle_buffer": block,
                 "row_groups": row_groups(root)}


def open_rows(root: Any) -> Any:
    import pyarrow.parquet as pq

    for f in bench_data.files(root):
        yield from range(pq.ParquetFile(f).metadata.num_rows)


def row_groups(root: Any) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_row_groups for f in bench_data.files(root))


def few_row_groups_probe(root: Any, tf: Callable, prepare: Callable, batch_size: int) -> dict:
    """Restore a 2-worker state on a dataset with < 10 row groups per worker; report what happens."""
    make = lambda: loader(root, tf, batch_size, 2, 8)  # noqa: E731
    state = state_after(make, 6)  # past each worker's first shuffle block: the state holds datasets' position
    try:
        first_batch_after_restore(make, state, prepare)
        return {"ok": True, "row_groups": row_groups(root)}
    except Exception as err:  # noqa: BLE001  (the failure is the finding)
        # a worker's exception arrives wrapped; its last line is the original "Type: message"
        return {"ok": False, "row_groups": row_groups(root), "error": str(err).strip().splitlines()[-1][:200]}


@benchmark("resume")
def run(ctx: Context) -> dict:
    from bench.pipeline import hubtune_prepare, timm_transforms

    image_size, batch_size = ctx.pick((64, 8), (160, 32))
    cfg, train_tf, _ = timm_transforms(image_size)
    prepare = hubtune_prepare(cfg)
    zero = bench_data.dataset(*ctx.pick((128, 2), (800, 4)))
    cases = [(0, zero, True)]
    if not ctx.quick:  # quick: the 2-worker timing needs a dataset with >= 20 row groups; the probe still runs
        cases.append((2, bench_data.dataset(2400, 8), False))
    rows, results, params = [], {}, {}
    for workers, root, skip in cases:
        res, info = case(ctx, root, train_tf, prepare, batch_size, workers, skip)
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
    probe = few_row_groups_probe(zero, train_tf, prepare, batch_size)
    rows.append(row(f"resume, 2 workers, {probe['row_groups']} row groups (< 10 per worker)", "s", None,
                    status="works" if probe["ok"] else "fails",
                    note="" if probe["ok"] else f"restoring the loader state raises {probe['error']}"))
    return {"rows": rows,
            "params": {"image_size": image_size, "batch_size": batch_size, "transforms": "train (seeded augmentation)",
                       "first_batch": "normalized with hubtune.model.Normalize (CPU)",
                       "reps": ctx.reps, **params},
            "details": {"results": results, "few_row_groups_probe": probe}}
