"""Benchmark 3: the linear-probe fast path (`--cache-features`).

Always measured: the steady-state rate of a frozen-backbone (+ FrozenBatchNorm) run of hubtune's train(), where
every epoch recomputes the backbone (the plain Accelerate loop on the same frozen backbone is in the training
benchmark: cv_example is itself a linear probe).

With `--cache-features` in hubtune's TrainConfig, `hubtune_cached` runs train() twice on the same data, with every
group but the head frozen and --freeze-bn, without augmentation (--no-augment: one view, so an uncached run sees
the same images every epoch), for EPOCHS epochs: without and with --cache-features (a fresh, empty cache). It reports
the seconds of epochs 2..EPOCHS (between consecutive `epoch N/M` log lines: train, eval, checkpoint), the
end-to-end wall time of train(), and whether the final head weights (last checkpoint) and the per-epoch history
are identical. Without the flag (older hubtune), the row says "not implemented" and a bench-side prototype (not
hubtune) shows what the fast path would give: with deterministic (eval) transforms and fixed BatchNorm, the head
trained on cached pooled features ends bit-for-bit (or to float rounding) where the head trained through the
frozen backbone ends.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

from bench import data as bench_data
from bench import training
from bench.common import Context, alternate, benchmark, row, summarize

CATS_VS_DOGS_TRAIN = 21069  # 90% of microsoft/cats_vs_dogs' 23,410 images (hubtune's default --val-fraction 0.1)
EPOCH_LINE = re.compile(r"(?:^|\] )epoch (\d+)/\d+ \|")  # train.py's end-of-epoch line


def has_cache_features() -> bool:
    """Whether this hubtune's TrainConfig has the --cache-features option."""
    from hubtune.config import TrainConfig

    return "cache_features" in {f.name for f in dataclasses.fields(TrainConfig)}


def prototype(root: Path, image_size: int, batch_size: int, epochs: int, workers: int) -> dict[str, Any]:
    """Epoch times and final head weights: uncached (backbone every epoch) vs cached features (backbone once)."""
    import timm
    import torch
    import torch.nn.functional as F

    from bench.pipeline import hubtune_loader, hubtune_prepare, timm_transforms
    from hubtune import model as model_lib

    cfg, _, eval_tf = timm_transforms(image_size)
    prepare = hubtune_prepare(cfg)  # hubtune's loaders yield uint8: normalized per batch, as train() does
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    model_lib.freeze(net, model_lib.resolve_freeze(net, "stem,stages"), freeze_bn=True)
    net.train()
    head = net.get_classifier()
    init = copy.deepcopy(head.state_dict())

    def optimizer() -> torch.optim.Optimizer:
        head.load_state_dict(init)
        return torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)

    def step(opt: torch.optim.Optimizer, logits: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # uncached: what a frozen-backbone run does every epoch
    opt, uncached_s = optimizer(), []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in hubtune_loader(root, eval_tf, False, batch_size, workers):
            step(opt, net(prepare(batch.pixel_values)), batch.labels)
        uncached_s.append(time.perf_counter() - start)
    uncached_w = copy.deepcopy(head.state_dict())

    # cached: the first epoch computes pooled features once (no graph), later epochs train the head on them
    opt, cached_s, cache = optimizer(), [], []
    start = time.perf_counter()
    for batch in hubtune_loader(root, eval_tf, False, batch_size, workers):
        with torch.no_grad():
            feats = net.forward_head(net.forward_features(prepare(batch.pixel_values)), pre_logits=True)
        cache.append((feats, batch.labels))
        step(opt, head(feats), batch.labels)
    cached_s.append(time.perf_counter() - start)
    for _ in range(epochs - 1):
        start = time.perf_counter()
        for feats, y in cache:
            step(opt, head(feats), y)
        cached_s.append(time.perf_counter() - start)
    diff = max((uncached_w[k] - head.state_dict()[k]).abs().max().item() for k in uncached_w)
    images = sum(len(y) for _, y in cache)
    return {"images": images, "epochs": epochs, "uncached_epoch_s": [round(s, 3) for s in uncached_s],
            "cached_epoch_s": [round(s, 4) for s in cached_s], "max_abs_head_weight_diff": diff,
            "cache_mb": round(sum(f.numel() * f.element_size() for f, _ in cache) / 2**20, 2)}


def prototype_rows(ctx: Context, image_size: int, batch_size: int, frozen: dict) -> tuple[list[dict], dict]:
    """The 'not implemented' row, with the bench prototype's attainable speed-up in its note."""
    probe_n, probe_shards = ctx.pick((64, 2), (320, 2))
    proto = prototype(bench_data.dataset(probe_n, probe_shards), image_size, batch_size, epochs=2,
                      workers=ctx.pick(0, 2))
    later_uncached = proto["uncached_epoch_s"][1:]
    later_cached = proto["cached_epoch_s"][1:]
    speedup = (sum(later_uncached) / len(later_uncached)) / (sum(later_cached) / len(later_cached))
    rows = [row("linear probe, epochs after the first with --cache-features", "img/s", None, frozen,
                comparison_name="hubtune without a cache (backbone recomputed every epoch)", goal=(">=", 5.0),
                status="not implemented",
                note=(f"bench prototype (not hubtune): cached epochs {speedup:,.0f}x faster than uncached ones on "
                      f"{proto['images']} images, head weights equal to {proto['max_abs_head_weight_diff']:.1e}"))]
    return rows, {**proto, "later_epoch_speedup": round(speedup, 1),
                  "transforms": "eval (deterministic), as a cache requires"}


class EpochClock(logging.Handler):
    """Records perf_counter at each `epoch N/M |` log line of hubtune.train."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = EPOCH_LINE.search(record.getMessage())
        if match:
            self.times[int(match.group(1))] = time.perf_counter()


def probe_run(root: Path, out: Path, *, cache: bool, image_size: int, batch_size: int, epochs: int,
              workers: int) -> dict[str, Any]:
    """One train() linear probe (every group but the head frozen, --freeze-bn, no augmentation), timed per epoch."""
    import timm
    import torch
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from hubtune import checkpoint
    from hubtune import model as model_lib
    from hubtune.config import TrainConfig
    from hubtune.train import train

    groups = model_lib.param_groups(timm.create_model("resnet18", pretrained=False, num_classes=2))
    freeze = ",".join(sorted(set(groups.values()) - {model_lib.HEAD_GROUP}))
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = TrainConfig(model="resnet18", pretrained=False, dataset=str(root), image_size=image_size,
                      batch_size=batch_size, epochs=epochs, num_workers=workers, freeze=freeze, freeze_bn=True,
                      augment=False, cache_features=cache, feature_cache_dir=str(out / "features"),
                      output_dir=str(out / "run"), log_every=10**6, progress=False, val_fraction=0.1, seed=0)
    logger = logging.getLogger(training.LOGGER)
    clock = EpochClock()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        start = time.perf_counter()
        result = train(cfg)
        end_to_end = time.perf_counter() - start
    finally:
        logger.removeHandler(clock)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    times = [start] + [clock.times[e] for e in range(1, epochs + 1)]
    last = checkpoint.listing(out / "run")[-1]  # the newest
    weights = load_file(str(last / checkpoint.MODEL_FILE))
    head = timm.create_model("resnet18", pretrained=False, num_classes=2).pretrained_cfg["classifier"]
    return {"end_to_end_s": end_to_end, "epoch_s": [b - a for a, b in zip(times, times[1:])],
            "head": {k: v for k, v in weights.items() if k.startswith(head + ".")},
            "history": [{k: row[k] for k in ("epoch", "step", "train_loss", "val_loss", "val_accuracy", "train_examples",
                                             "val_examples")} for row in (r.to_json() for r in result.history)],
            "freeze": freeze, "torch_threads": torch.get_num_threads()}


def hubtune_cached(ctx: Context, image_size: int, batch_size: int) -> tuple[list[dict], dict]:
    """hubtune train() with vs without --cache-features: epochs 2..N, end to end, identical results."""
    n, shards, epochs, workers = ctx.pick((64, 2, 2, 0), (800, 4, 10, 2))
    root = bench_data.dataset(n, shards)
    runs = {}
    for name, cache in (("uncached", False), ("cached", True)):  # one run each: every epoch is a sample
        runs[name] = probe_run(root, ctx.scratch / f"probe-{name}", cache=cache, image_size=image_size,
                               batch_size=batch_size, epochs=epochs, workers=workers)
        ctx.log(f"  {name}: epochs {', '.join(f'{s:.2f}' for s in runs[name]['epoch_s'])} s; end to end "
                f"{runs[name]['end_to_end_s']:.1f} s")
    later = {k: summarize(r["epoch_s"][1:]) for k, r in runs.items()}
    total = {k: summarize([r["end_to_end_s"]]) for k, r in runs.items()}
    head_diff = max((runs["cached"]["head"][k] - v).abs().max().item() for k, v in runs["uncached"]["head"].items())
    same_history = runs["cached"]["history"] == runs["uncached"]["history"]
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(runs["cached"]["history"], runs["uncached"]["history"])
                    for k in ("train_loss", "val_loss"))
    identical = head_diff == 0 and same_history
    speedup = later["uncached"]["median"] / later["cached"]["median"]
    uncached_name = "hubtune without --cache-features (backbone every epoch)"
    rows = [
        row(f"linear probe --cache-features: seconds per epoch, epochs 2-{epochs}", "s", later["cached"],
            later["uncached"], comparison_name=uncached_name, ratio_of="cached / uncached", goal=("<=", 0.2),
            higher_is_better=False,
            note=f"{speedup:,.1f}x faster; {n} images, {epochs} epochs; median and spread over the epochs"),
        row(f"linear probe --cache-features: {epochs} epochs end to end (train())", "s", total["cached"],
            total["uncached"], comparison_name=uncached_name, ratio_of="cached / uncached", higher_is_better=False,
            note=f"epoch 1 (computes the cache): {runs['cached']['epoch_s'][0]:.1f} s cached vs "
                 f"{runs['uncached']['epoch_s'][0]:.1f} s uncached, setup included"),
        row("linear probe --cache-features: final head weights and history identical to uncached", "", None,
            status="identical" if identical else "differ",
            note=f"head weights max abs diff {head_diff:.1e}, history {'equal' if same_history else 'differs'} "
                 f"(losses max abs diff {loss_diff:.1e})"),
    ]
    details = {"images": n, "epochs": epochs, "num_workers": workers, "freeze": runs["cached"]["freeze"],
               "augment": False, "later_epochs_s": later, "end_to_end_s": total, "later_epoch_speedup": speedup,
               "head_max_abs_diff": head_diff, "history_identical": same_history, "loss_max_abs_diff": loss_diff,
               "runs": {k: {"epoch_s": r["epoch_s"], "end_to_end_s": r["end_to_end_s"], "history": r["history"]}
                        for k, r in runs.items()}}
    return rows, details


@benchmark("linear_probe")
def run(ctx: Context) -> dict:
    n, shards, image_size, batch_size, warm, measure = ctx.pick((64, 2, 64, 8, 1, 2), (2400, 8, 160, 32, 1, 3))
    root = bench_data.dataset(n, shards)
    training.warm_up(image_size, batch_size)
    variant = training.Variant("frozen backbone + BN", "stem,stages", "no")
    counter = iter(range(10**6))

    def frozen() -> float:
        return training.hubtune_rate(root, ctx.scratch / f"probe-{next(counter)}", variant, image_size=image_size,
                                     batch_size=batch_size, warm=warm, measure=measure)

    res = alternate(ctx.reps, {"hubtune": frozen}, ctx.log, "frozen backbone")
    epoch = CATS_VS_DOGS_TRAIN
    rows = [row("linear probe (frozen backbone + BN), every epoch: what exists", "img/s", res["hubtune"],
                note=f"a {epoch:,}-image epoch takes {epoch / res['hubtune']['median'] / 60:.1f} min here, "
                     "every epoch without --cache-features")]
    if has_cache_features():
        cached_rows, cached = hubtune_cached(ctx, image_size, batch_size)
        details = {"results": res, "cache_features": cached}
    else:  # older hubtune: the prototype stands in for hubtune_cached
        cached_rows, proto = prototype_rows(ctx, image_size, batch_size, res["hubtune"])
        details = {"results": res, "prototype": proto}
    return {
        "rows": rows + cached_rows,
        "params": {"model": "resnet18 (timm, random init)", "image_size": image_size, "batch_size": batch_size,
                   "freeze": "stem,stages", "freeze_bn": True, "reps": ctx.reps, "warm_steps": warm,
                   "measured_steps": measure, "cache_features_in_hubtune": has_cache_features()},
        "details": details,
    }
