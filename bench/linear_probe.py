"""Benchmark 3: the linear-probe fast path (`--cache-features`).

hubtune has no --cache-features yet, so its row says "not implemented". What exists is measured: a frozen-backbone
(+ FrozenBatchNorm) run of hubtune's train(), where every epoch recomputes the backbone, against the plain
Accelerate loop (cv_example is itself a linear probe). A bench-side prototype (not hubtune) shows what the fast path
would give on this machine and that it can give identical results: with deterministic (eval) transforms and fixed
BatchNorm, the head trained on cached pooled features ends bit-for-bit (or to float rounding) where the head trained
through the frozen backbone ends.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from bench import data as bench_data
from bench import training
from bench.common import Context, alternate, benchmark, row

CATS_VS_DOGS_TRAIN = 21069  # 90% of microsoft/cats_vs_dogs' 23,410 images (hubtune's default --val-fraction 0.1)


def prototype(root: Path, image_size: int, batch_size: int, epochs: int, workers: int) -> dict[str, Any]:
    """Epoch times and final head weights: uncached (backbone every epoch) vs cached features (backbone once)."""
    import timm
    import torch
    import torch.nn.functional as F

    from bench.pipeline import hubtune_loader, timm_transforms
    from hubtune import model as model_lib

    _, _, eval_tf = timm_transforms(image_size)
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
            step(opt, net(batch["pixel_values"]), batch["labels"])
        uncached_s.append(time.perf_counter() - start)
    uncached_w = copy.deepcopy(head.state_dict())

    # cached: the first epoch computes pooled features once (no graph), later epochs train the head on them
    opt, cached_s, cache = optimizer(), [], []
    start = time.perf_counter()
    for batch in hubtune_loader(root, eval_tf, False, batch_size, workers):
        with torch.no_grad():
            feats = net.forward_head(net.forward_features(batch["pixel_values"]), pre_logits=True)
        cache.append((feats, batch["labels"]))
        step(opt, head(feats), batch["labels"])
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


@benchmark("linear_probe")
def run(ctx: Context) -> dict:
    n, shards, image_size, batch_size, warm, measure = ctx.pick((64, 2, 64, 8, 1, 2), (2400, 8, 160, 32, 1, 4))
    root = bench_data.dataset(n, shards)
    training.warm_up(image_size, batch_size)
    variant = training.Variant("frozen backbone + BN", "stem,stages", "no")
    counter = iter(range(10**6))

    def frozen() -> float:
        times = training.hubtune_steps(root, ctx.scratch / f"probe-{next(counter)}", variant, image_size=image_size,
                                       batch_size=batch_size, steps=warm + measure)
        return training.window_rate(times, warm, measure, batch_size)

    # the plain Accelerate loop on the same frozen backbone is in the training benchmark (cv_example is a probe)
    res = alternate(ctx.reps, {"hubtune": frozen}, ctx.log, "frozen backbone")
    probe_n, probe_shards = ctx.pick((64, 2), (800, 4))
    proto = prototype(bench_data.dataset(probe_n, probe_shards), image_size, batch_size, epochs=ctx.pick(2, 3),
                      workers=ctx.pick(0, 2))
    later_uncached = proto["uncached_epoch_s"][1:]
    later_cached = proto["cached_epoch_s"][1:]
    speedup = (sum(later_uncached) / len(later_uncached)) / (sum(later_cached) / len(later_cached))
    epoch = CATS_VS_DOGS_TRAIN
    rows = [
        row("linear probe (frozen backbone + BN), every epoch: what exists", "img/s", res["hubtune"],
            note=f"a {epoch:,}-image epoch takes {epoch / res['hubtune']['median'] / 60:.1f} min here, every epoch"),
        row("linear probe, epochs after the first with --cache-features", "img/s", None, res["hubtune"],
            comparison_name="hubtune without a cache (backbone recomputed every epoch)", goal=(">=", 5.0),
            status="not implemented",
            note=(f"bench prototype (not hubtune): cached epochs {speedup:,.0f}x faster than uncached ones on "
                  f"{proto['images']} images, head weights equal to {proto['max_abs_head_weight_diff']:.1e}")),
    ]
    return {
        "rows": rows,
        "params": {"model": "resnet18 (timm, random init)", "image_size": image_size, "batch_size": batch_size,
                   "freeze": "stem,stages", "freeze_bn": True, "reps": ctx.reps, "warm_steps": warm,
                   "measured_steps": measure},
        "details": {"results": res, "prototype": {**proto, "later_epoch_speedup": round(speedup, 1),
                                                  "transforms": "eval (deterministic), as a cache requires"}},
    }
