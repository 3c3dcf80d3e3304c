"""Benchmark 5: memory. Peak RSS of a streaming pass over 2k vs 20k examples, and checkpoint sizes by freeze spec.

RSS: each pass runs in its own process (bench/rss_child.py), which reports its peak (VmHWM; see there why not
ru_maxrss), so passes cannot contaminate each other; passes run side by side, as a peak does not depend on timing.
Images are small (64x48 JPEGs, train transforms at 64 px) so 20k examples take seconds; what is measured is
whether anything in the pipeline grows with the number of examples read. The comparison is the transformers
example's map-style pipeline over the same files (memory-mapped Arrow cache).

Checkpoints: hubtune.checkpoint.write of resnet18 after one AdamW step, for a full fine-tune, frozen stem+stages 0-2
and a frozen backbone; the comparison is `accelerator.save_state` of the cv_example-style setup (AdamW over the
same trainable parameters), the checkpoint a plain Accelerate loop writes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import data as bench_data
from bench.common import REPO, Context, benchmark, row, single, summarize

SPECS = (("full fine-tune", ""), ("frozen stem+stages 0-2", "stem,stages.0-2"), ("frozen backbone", "stem,stages"))


def rss_passes(jobs: dict[tuple, tuple[Path, str, int]]) -> dict[tuple, dict[str, Any]]:
    """One child process per job (dataset, pipeline, workers), all side by side: a peak does not depend on timing."""
    procs = {}
    for name, (root, pipeline, workers) in jobs.items():
        cmd = [sys.executable, "-m", "bench.rss_child", "--data", str(root), "--pipeline", pipeline,
               "--workers", str(workers)]
        procs[name] = (cmd, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True))
    out = {}
    for name, (cmd, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def rss_rows(ctx: Context) -> tuple[list[dict], dict]:
    small_n, large_n = ctx.pick((200, 1000), (2000, 20000))  # the goal is about 2k vs 20k
    size = (64, 48)
    roots = {"small": bench_data.dataset(small_n, 2, size=size), "large": bench_data.dataset(large_n, 10, size=size)}
    from bench.pipeline import map_style

    configs = (("hubtune", 0),) if ctx.quick else (("hubtune", 0), ("example", 0), ("hubtune", 2))
    if not ctx.quick:
        for root in roots.values():  # the example's Arrow cache, built outside the measured processes
            map_style(bench_data.files(root))
    jobs = {(p, w, which): (root, p, w) for p, w in configs for which, root in roots.items()}
    passes: dict[tuple, list[dict]] = {job: [] for job in jobs}
    reps = min(ctx.reps, 2)  # peaks are deterministic to a few MiB; every pass is recorded
    for rep in range(reps):
        for job, res in rss_passes(jobs).items():
            passes[job].append(res)
            key = "peak_rss_worker_mb" if job[1] else "peak_rss_mb"
            ctx.log(f"  rss {job[0]}/{job[1]}w rep {rep + 1}/{reps} {job[2]}: {res[key]} MiB "
                    f"({res['images']} images, {res['seconds']} s)")
    rows, details = [], {}
    for pipeline, workers in configs:
        key = "peak_rss_worker_mb" if workers else "peak_rss_mb"
        runs = {which: passes[(pipeline, workers, which)] for which in roots}
        res = {which: summarize([p[key] for p in r]) for which, r in runs.items()}
        details[f"{pipeline}_{workers}_workers"] = {"summary": res, "passes": runs}
        where = "peak RSS of a loader worker" if workers else "peak RSS"
        name = "hubtune streaming" if pipeline == "hubtune" else "transformers example pipeline (map-style)"
        before = {w: statistics.median(p["rss_before_iterating_mb"] for p in r) for w, r in runs.items()}
        own = {w: res[w]["median"] - before[w] for w in runs}
        note = (f"growth of the pipeline's own memory (peak minus the {before['small']:,.0f} MiB held before "
                f"reading): {own['small']:,.0f} -> {own['large']:,.0f} MiB") if not workers else ""
        rows.append(row(f"memory, {name}, {workers} workers: {where}, {large_n:,} vs {small_n:,} examples", "MiB",
                        res["large"], res["small"], comparison_name=f"same pipeline, {small_n:,} examples",
                        ratio_of=f"{large_n:,} / {small_n:,} examples",
                        goal=("<", 1.10) if pipeline == "hubtune" else None, higher_is_better=False, note=note))
    return rows, details


def hubtune_checkpoint(out: Path, spec: str) -> dict[str, int]:
    """Write a hubtune checkpoint of resnet18 with `spec` frozen after one optimizer step; sizes in bytes."""
    import timm
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    from hubtune import checkpoint
    from hubtune import model as model_lib

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    model_lib.freeze(net, model_lib.resolve_freeze(net, spec) if spec else [], freeze_bn=bool(spec))
    opt = create_optimizer_v2(net, opt="adamw", lr=1e-3, weight_decay=0.05)
    F.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    opt.step()
    meta, tensors = checkpoint.optimizer_state(opt)
    path = checkpoint.write(out, 1, net.state_dict(), meta, tensors, [checkpoint.rng_state()], {"run_state": {}})
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"total": checkpoint.dir_size(path), "model": (path / checkpoint.MODEL_FILE).stat().st_size,
            "optimizer": (path / checkpoint.OPTIMIZER_TENSORS).stat().st_size, "trainable_params": trainable,
            "optimizer_expected": 2 * 4 * trainable}


def accelerate_checkpoint(out: Path, spec: str) -> int:
    """accelerator.save_state of the cv_example-style setup with the same frozen parameters; size in bytes."""
    import timm
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hubtune import checkpoint
    from hubtune import model as model_lib

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    frozen = set(model_lib.resolve_freeze(net, spec)) if spec else set()
    for name, param in net.named_parameters():
        param.requires_grad = name not in frozen
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    net, opt = accelerator.prepare(net, opt)
    F.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    opt.step()
    accelerator.save_state(str(out))
    return checkpoint.dir_size(out)


def checkpoint_rows(ctx: Context) -> tuple[list[dict], dict]:
    rows, details = [], {}
    for i, (name, spec) in enumerate(SPECS):
        hub = hubtune_checkpoint(ctx.scratch / f"hub-{i}", spec)
        acc = accelerate_checkpoint(ctx.scratch / f"acc-{i}", spec)
        details[name] = {"hubtune": hub, "accelerate_save_state": acc}
        exact = abs(hub["optimizer"] - hub["optimizer_expected"]) < 64 * 1024  # safetensors header + step counters
        rows.append(row(f"checkpoint size, {name}", "MiB", single(hub["total"] / 2**20), single(acc / 2**20),
                        comparison_name="accelerator.save_state (cv_example-style loop)", higher_is_better=False,
                        status="met" if exact else "missed", goal=None,
                        note=f"optimizer state {hub['optimizer'] / 2**20:.1f} MiB for "
                             f"{hub['trainable_params']:,} trainable parameters (2 x fp32 each = "
                             f"{hub['optimizer_expected'] / 2**20:.1f} MiB)"))
        rows[-1]["goal"] = "optimizer state only for trainable parameters"
    return rows, details


@benchmark("memory")
def run(ctx: Context) -> dict:
    rss, rss_details = rss_rows(ctx)
    ckpt, ckpt_details = checkpoint_rows(ctx)
    return {"rows": rss + ckpt,
            "params": {"rss_images": "64x48 JPEG", "image_size": 64, "transforms": "train", "batch_size": 64,
                       "checkpoint_model": "resnet18, 2 classes, AdamW", "reps": ctx.reps},
            "details": {"rss": rss_details, "checkpoints": ckpt_details}}
