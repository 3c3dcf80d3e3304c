"""Benchmark: what experiment tracking and EMA weights cost per training step, and what the EMA copy weighs.

hubtune's train() on resnet18 (full fine-tune, fp32, the generated data of bench/training.py), timed like the
training benchmark from its own per-step log lines, alternating three runs per repetition: plain (`--report-to none`),
`--report-to tensorboard` (here a scalar write every step, since the timing needs `--log-every 1`: the worst case;
the default logs every 20 steps) and `--model-ema` (one lerp over every tensor per optimizer step). Goal: each
within 3% of the plain rate. Memory: the EMA keeps a full copy of the model (timm's ModelEmaV3; frozen parameters
stay equal to the model's), while a checkpoint stores only the EMA of what is not frozen; both are measured for a
full fine-tune and a frozen backbone.
"""

from __future__ import annotations

from bench import data as bench_data
from bench.common import Context, alternate, benchmark, row, single
from bench.training import Variant, rate_runners, warm_up

BASE = Variant("full fine-tune, fp32", "", "no")
TRACKED = Variant("full fine-tune, fp32, --report-to tensorboard", "", "no", report_to="tensorboard")
EMA = Variant("full fine-tune, fp32, --model-ema", "", "no", model_ema=True)


def ema_sizes(freeze: str) -> dict[str, float]:
    """MiB of the EMA copy in memory and of what a checkpoint stores of it, for resnet18 with `freeze`."""
    import timm
    from timm.utils import ModelEmaV3

    from hubtune import model as model_lib

    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    frozen = set(model_lib.resolve_freeze(net, freeze)) if freeze else set()
    model_lib.freeze(net, sorted(frozen), freeze_bn=bool(freeze))
    ema = ModelEmaV3(net, decay=0.9998)
    state = ema.module.state_dict()
    mib = 2**20
    return {"in_memory_mib": round(sum(t.numel() * t.element_size() for t in state.values()) / mib, 2),
            "in_checkpoint_mib": round(sum(t.numel() * t.element_size() for k, t in state.items()
                                           if k not in frozen) / mib, 2)}


@benchmark("overheads")
def run(ctx: Context) -> dict:
    n, shards, image_size, batch_size, warm, measure = ctx.pick((64, 2, 64, 8, 1, 2), (2400, 8, 160, 32, 1, 8))
    root = bench_data.dataset(n, shards)
    warm_up(image_size, batch_size)
    runners = rate_runners(ctx, root, "overheads", {"plain": BASE, "tensorboard": TRACKED, "ema": EMA},
                           image_size=image_size, batch_size=batch_size, warm=warm, measure=measure)
    results = alternate(ctx.reps, runners, ctx.log, "overheads")
    rows = [row(f"training step rate with {what}, resnet18 full fine-tune fp32", "img/s", results[key],
                results["plain"], comparison_name="hubtune --report-to none", goal=(">=", 0.97),
                note="ratio = rate with it / rate without: within 3% is the goal")
            for key, what in (("tensorboard", "--report-to tensorboard (a write every step)"),
                              ("ema", "--model-ema"))]
    sizes = {"full fine-tune": ema_sizes(""), "frozen backbone": ema_sizes("stem,stages")}
    for name, size in sizes.items():
        rows.append(row(f"EMA copy of resnet18, {name}: in memory / in a checkpoint", "MiB",
                        single(size["in_memory_mib"]), single(size["in_checkpoint_mib"]),
                        comparison_name="in a checkpoint", note="the copy is the whole model (timm ModelEmaV3); a "
                        "checkpoint stores only the EMA of what is not frozen"))
    return {"rows": rows,
            "params": {"model": "resnet18 (timm, random init)", "image_size": image_size, "batch_size": batch_size,
                       "warm_steps": warm, "measured_steps": measure, "reps": ctx.reps, "num_workers": 2},
            "details": {"results": results, "ema_sizes": sizes}}



