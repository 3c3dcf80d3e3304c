"""Benchmark: what each of timm's training recipes costs in hubtune's training loop (images/s with and without).

The training benchmark's setup (resnet18, random init, the generated JPEG parquet, 2 workers, the rate read from
train()'s own step log lines in a window after warm-up), run once without any recipe and once per recipe, alternating
(ABBA) so the machine's drift hits every variant alike. RandAugment (--aa) runs in the loader workers, per image;
erasing (--reprob) and mixup/cutmix run on the normalized batch in the training process; label smoothing only
changes the loss.
"""

from __future__ import annotations

from bench import data as bench_data
from bench.common import Context, alternate, benchmark, row
from bench.training import Variant, rate_runners, warm_up

BASE = "default augmentation (crop, flip, color jitter)"
RECIPES = {
    "--smoothing 0.1": (("smoothing", 0.1),),
    "--mixup 0.8 --cutmix 1.0": (("mixup", 0.8), ("cutmix", 1.0)),
    "--aa rand-m9-mstd0.5-inc1": (("aa", "rand-m9-mstd0.5-inc1"),),
    "--reprob 0.25": (("reprob", 0.25),),
    "all of the above (timm's ImageNet recipe)": (("smoothing", 0.1), ("mixup", 0.8), ("cutmix", 1.0),
                                                  ("aa", "rand-m9-mstd0.5-inc1"), ("reprob", 0.25)),
}


@benchmark("recipes")
def run(ctx: Context) -> dict:
    n, shards, image_size, batch_size, warm, measure = ctx.pick((64, 2, 64, 8, 1, 2), (2400, 8, 160, 32, 1, 3))
    root = bench_data.dataset(n, shards)
    warm_up(image_size, batch_size)
    variants = {BASE: Variant(BASE, "", "no")} | {name: Variant(name, "", "no", extra=extra)
                                                  for name, extra in RECIPES.items()}
    names = list(variants)[:2] if ctx.quick else list(variants)
    runners = rate_runners(ctx, root, "recipes", {name: variants[name] for name in names}, image_size=image_size,
                           batch_size=batch_size, warm=warm, measure=measure)
    results = alternate(ctx.reps, runners, ctx.log, "recipes")
    base = results[BASE]
    rows = [row(f"recipes, {name}", "img/s", results[name], base, comparison_name=BASE,
                ratio_of="with the recipe / without", note="" if name == BASE else
                f"{results[name]['median'] / base['median']:.2f}x the rate without it") for name in names]
    return {
        "rows": rows,
        "params": {"model": "resnet18 (timm, random init)", "image_size": image_size, "batch_size": batch_size,
                   "num_workers": 2, "warm_steps": warm, "measured_steps": measure, "images": n, "reps": ctx.reps,
                   "variants": {name: dict(variants[name].extra) for name in names}},
        "details": {"results": results,
                    "relative_to_base": {name: round(results[name]["median"] / base["median"], 3) for name in names}},
    }
