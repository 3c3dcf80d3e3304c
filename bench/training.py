"""Benchmark 2: training throughput (images/s) of hubtune's train() vs a plain Accelerate loop (cv_example style).

Both train timm resnet18 (random init: no Hub access here) at the same resolution, batch size, workers and data
(the generated parquet files). hubtune runs its real `train(TrainConfig)`; its steady-state rate is read from the
timestamps of its own per-step log lines (`--log-every 1`) between the end of step `warm` and the end of step
`warm + measure`, so setup, the first steps (oneDNN kernel creation, worker start, first shuffle block) and the
end-of-run evaluation/export are outside the window. The run is stopped right after the window. The comparison's
window is the same steps of its loop.

hubtune feeds the model through its own per-batch Normalize (uint8 loader output); the comparison does ToTensor +
Normalize per image in its workers (timm's usual transforms). hubtune's --channels-last and, in full runs only,
--compile (torch.compile, inductor on the CPU; its window starts one step later, after compilation) are timed
against the same unchanged fp32 comparison loop; a --compile run that fails is reported with its error instead of
a rate.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import accelerate_loop
from bench import data as bench_data
from bench.common import Context, alternate, benchmark, row

LOGGER = "hubtune"
STEP_LINE = re.compile(r"(?:^|\] )step (\d+)(?:/\d+)? \|")  # "[RANK 0] step 12 | loss ..." (train.py's log line)


@dataclass(frozen=True)
class Variant:
    name: str
    freeze: str  # hubtune --freeze spec ("" = full fine-tune)
    mixed_precision: str
    channels_last: bool = False  # hubtune only: --channels-last
    compile: bool = False  # hubtune only: --compile
    report_to: str = "none"  # hubtune only: --report-to (log lines every step here: its worst case)
    model_ema: bool = False  # hubtune only: --model-ema
    extra: tuple[tuple[str, Any], ...] = ()  # hubtune only: more TrainConfig fields (the recipes benchmark)


VARIANTS = [
    Variant("full fine-tune, fp32", "", "no"),
    Variant("full fine-tune, fp32, hubtune --channels-last", "", "no", channels_last=True),
    Variant("full fine-tune, fp32, hubtune --compile", "", "no", compile=True),
    Variant("full fine-tune, bf16", "", "bf16"),
    Variant("frozen stem+stages 0-2, fp32", "stem,stages.0-2", "no"),
    Variant("frozen stem+stages 0-2, bf16", "stem,stages.0-2", "bf16"),
    Variant("frozen backbone (linear probe), fp32", "stem,stages", "no"),
    Variant("frozen backbone (linear probe), bf16", "stem,stages", "bf16"),
]


class _StopAfterWindow(Exception):
    """Raised from the log handler once the measured window is over: the rest of the run is not measured."""


class StepClock(logging.Handler):
    """Records perf_counter at each `step N |` log line of hubtune.train and stops the run after `last`."""

    def __init__(self, last: int) -> None:
        super().__init__(logging.INFO)
        self.last = last
        self.times: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = STEP_LINE.search(record.getMessage())
        if match:
            step = int(match.group(1))
            self.times[step] = time.perf_counter()
            if step >= self.last:
                raise _StopAfterWindow


def hubtune_steps(root: Path, out: Path, variant: Variant, *, image_size: int, batch_size: int, steps: int,
                  num_workers: int = 2) -> dict[int, float]:
    """Run hubtune.train.train for `steps` optimizer steps; {step: perf_counter time at its log line}."""
    from accelerate.state import AcceleratorState

    from hubtune.config import TrainConfig
    from hubtune.train import train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = TrainConfig(model="resnet18", pretrained=False, dataset=str(root), image_size=image_size,
                      batch_size=batch_size, epochs=1, max_steps=steps + 1, num_workers=num_workers,
                      freeze=variant.freeze, freeze_bn=bool(variant.freeze), mixed_precision=variant.mixed_precision,
                      channels_last=variant.channels_last, compile=variant.compile, output_dir=str(out), log_every=1,
                      progress=False, val_fraction=0.05, seed=0, report_to=variant.report_to,
                      model_ema=variant.model_ema, **dict(variant.extra))
    logger = logging.getLogger(LOGGER)
    clock = StepClock(steps)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # keep hubtune's own INFO lines (parameter table, steps) out of the bench output
    try:
        train(cfg)
    except _StopAfterWindow:
        pass
    finally:
        logger.removeHandler(clock)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        # the aborted run's loader iterator sits in reference cycles: collect it now, so its workers stop
        # prefetching (they would compete for the CPU with the next run) and exit cleanly
        gc.collect()
    return clock.times


def hubtune_rate(root: Path, out: Path, variant: Variant, *, image_size: int, batch_size: int, warm: int,
                 measure: int) -> float:
    """Images/s of hubtune's train() on `variant` in the window of `measure` steps after `warm` (hubtune_steps)."""
    times = hubtune_steps(root, out, variant, image_size=image_size, batch_size=batch_size, steps=warm + measure)
    return window_rate(times, warm, measure, batch_size)


def rate_runners(ctx: Context, root: Path, tag: str, variants: dict[str, Variant], *, image_size: int,
                 batch_size: int, warm: int, measure: int) -> dict[str, Callable[[], float]]:
    """{name: runner} for `alternate`: each call trains `variants[name]` afresh (a folder of its own) and returns its
    images/s (hubtune_rate)."""
    counter = iter(range(10**6))

    def runner(variant: Variant) -> Callable[[], float]:
        return lambda: hubtune_rate(root, ctx.scratch / f"{tag}-{next(counter)}", variant, image_size=image_size,
                                    batch_size=batch_size, warm=warm, measure=measure)

    return {name: runner(variant) for name, variant in variants.items()}


def window_rate(times: dict[int, float] | list[float], warm: int, measure: int, batch_size: int) -> float:
    """Images/s between the end of step `warm` and the end of step `warm + measure` (steps counted from 1)."""
    if isinstance(times, list):
        times = {i + 1: t for i, t in enumerate(times)}
    return measure * batch_size / (times[warm + measure] - times[warm])


def frozen_names(spec: str) -> list[str]:
    """The parameter names hubtune freezes for `spec` on resnet18 (the comparison freezes the same ones)."""
    import timm

    from hubtune import model as model_lib

    if not spec:
        return []
    return model_lib.resolve_freeze(timm.create_model("resnet18", pretrained=False, num_classes=2), spec)


def warm_up(image_size: int, batch_size: int) -> None:
    """One untimed forward/backward per precision: oneDNN creates its kernels on first use in the process."""
    import timm
    import torch

    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    x = torch.randn(batch_size, 3, image_size, image_size)
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x).float().sum().backward()


def pair(ctx: Context, root: Path, files: list[str], variant: Variant, *, image_size: int, batch_size: int,
         warm: int, measure: int, tag: str, comparison: bool = True) -> dict[str, dict]:
    """hubtune vs the Accelerate loop (if `comparison`) on one variant, alternating, ctx.reps times each."""
    warm += variant.compile  # step 1 of a compiled run includes compiling the forward and backward graphs
    steps = warm + measure
    frozen = frozen_names(variant.freeze)
    counter = iter(range(10**6))

    def hub() -> float:
        return hubtune_rate(root, ctx.scratch / f"{tag}-{next(counter)}", variant, image_size=image_size,
                            batch_size=batch_size, warm=warm, measure=measure)

    def plain() -> float:
        times = accelerate_loop.train_steps(files, image_size=image_size, batch_size=batch_size, steps=steps,
                                            mixed_precision=variant.mixed_precision, frozen=frozen)
        return window_rate(times, warm, measure, batch_size)

    return alternate(ctx.reps, {"hubtune": hub, **({"accelerate": plain} if comparison else {})}, ctx.log,
                     variant.name)


def per_step_overheads(root: Path, batch_size: int) -> dict[str, Any]:
    """What hubtune's loop does per step beyond the comparison's: the loader state snapshot, loss.item()."""
    import torch

    from bench.pipeline import hubtune_loader, timm_transforms

    _, train_tf, _ = timm_transforms(64)
    out = {}
    for workers in (0, 2):
        loader = hubtune_loader(root, train_tf, True, batch_size, workers)
        it = iter(loader)
        for _ in range(3):
            next(it)
        start = time.perf_counter()
        for _ in range(200):
            loader.state_dict()
        out[f"loader_state_dict_ms_{workers}_workers"] = round((time.perf_counter() - start) / 200 * 1e3, 3)
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it, loader
    x = torch.tensor(1.0)
    start = time.perf_counter()
    for _ in range(1000):
        x.item()
    out["loss_item_us"] = round((time.perf_counter() - start) / 1000 * 1e6, 2)
    return out


@benchmark("training")
def run(ctx: Context) -> dict:
    n, shards, image_size, batch_size, warm, measure = ctx.pick((64, 2, 64, 8, 1, 2), (2400, 8, 160, 32, 1, 3))
    root = bench_data.dataset(n, shards)
    files = bench_data.files(root)
    # quick: the default fp32 fine-tune and --channels-last (--compile takes minutes to compile on 2 cores); the
    # latter's comparison is the former's (the same unchanged fp32 loop), not run again
    variants = [v for v in VARIANTS if not v.freeze and v.mixed_precision == "no" and not v.compile] if ctx.quick \
        else VARIANTS
    warm_up(image_size, batch_size)
    accelerate_loop.make_loader(files, lambda x: x, 1, 0)  # build the comparison's Arrow cache outside the timing
    rows, results, errors = [], {}, {}
    comparison_name = "plain Accelerate loop (cv_example style)"
    for i, variant in enumerate(variants):
        name = f"training, {variant.name}"
        try:
            reuse = ctx.quick and variant.channels_last
            res = pair(ctx, root, files, variant, image_size=image_size, batch_size=batch_size, warm=warm,
                       measure=measure, tag=f"v{i}", comparison=not reuse)
            if reuse:
                res["accelerate"] = results[VARIANTS[0].name]["accelerate"]
        except Exception as err:  # noqa: BLE001  (a failing --compile is a finding, not a broken benchmark)
            if not variant.compile:
                raise
            errors[variant.name] = f"{type(err).__name__}: {err}"[-3000:]
            ctx.log(f"  {variant.name}: failed: {errors[variant.name][-500:]}")
            last = (str(err).strip().splitlines() or [""])[-1][:200]
            rows.append(row(name, "img/s", None, comparison_name=comparison_name, status="fails",
                            note=f"{type(err).__name__}: {last} (full text in the JSON's details.errors)"))
            continue
        results[variant.name] = res
        goal = (">=", 1.0) if variant.freeze == "" else (">", 1.0)  # frozen: hubtune should skip work
        note = ""
        if variant.channels_last or variant.compile:
            base = results[VARIANTS[0].name]["hubtune"]["median"]
            note = f"{res['hubtune']['median'] / base:.2f}x hubtune's default fp32 rate in this run"
        rows.append(row(name, "img/s", res["hubtune"], res["accelerate"], comparison_name=comparison_name,
                        goal=goal, note=note))
    full = results[variants[0].name]["hubtune"]["median"]
    relative = {name: round(r["hubtune"]["median"] / full, 3) for name, r in results.items()}
    return {
        "rows": rows,
        "params": {"model": "resnet18 (timm, random init)", "image_size": image_size, "batch_size": batch_size,
                   "num_workers": 2, "warm_steps": warm, "warm_steps_compile": warm + 1, "measured_steps": measure,
                   "images": n, "freeze_bn_in_hubtune_frozen_variants": True, "reps": ctx.reps,
                   "variants": [v.name for v in variants]},
        "details": {"results": results, "errors": errors, "hubtune_rate_relative_to_full_fp32": relative,
                    "per_step_overheads": None if ctx.quick else per_step_overheads(root, batch_size)},
    }
