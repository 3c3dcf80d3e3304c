"""GPU check: hubtune's training throughput and correctness on one CUDA GPU, in one process.

What it measures (resnet50, random init, 224 px, batch 128, 12 loader workers by default):

* hubtune's real code path, `hubtune.train.train(TrainConfig(...))`, in these variants: fp32 ("no"), bf16, fp16,
  bf16 + channels_last, bf16 + channels_last + torch.compile, and a fully frozen backbone (`--freeze stem,stages
  --freeze-bn`) in bf16. Each run is timed step by step from train()'s own log line (`--log-every 1`: `step N |
  ... | data S`): the time each step ended, and the time the loop waited for its batch, are recorded (train() calls
  `loss.item()` every step, so the step times are synchronous). The rate is images/s between step `--warm` and the
  last step (`--steps`), so setup, the first batches (worker start, first shuffle block, cuDNN/compile warm-up),
  the end-of-run evaluation and the export are outside it. "data wait" is the share of that window the loop spent
  waiting for the loader. Caveat: the loader prefetches up to 4 batches per worker (48 with 12 workers), filled
  while the first steps run; after a slow start (compilation) the 70-step window partly drains that buffer, so a
  rate above "hubtune loader alone" is not sustainable over a whole epoch, where the slower of loader and GPU wins.
  Checks: the run finished, model.safetensors and metrics.json were written, the losses
  are finite; fp16 ran with Accelerate's GradScaler (its final scale is reported); compile: how many frames,
  graphs and graph breaks dynamo counted.
* the comparison: a plain Accelerate loop the way accelerate's examples/cv_example.py does it (map-style
  `datasets.load_dataset("parquet")` via `bench.accelerate_loop.make_loader`, torchvision transforms per image
  ending in ToTensor + Normalize, a torch DataLoader with the same workers, `Accelerator(mixed_precision="bf16")`,
  AdamW + OneCycleLR), in bf16, with (a) timm's training augmentation as per-image float transforms (the same
  augmentation as hubtune's) and (b) cv_example's own RandomResizedCrop(scale=(0.35, 1)) + ToTensor + Normalize.
* the linear-probe fast path: bench/linear_probe.py's `probe_run` (resnet18, every group but the head frozen,
  --freeze-bn, --no-augment) over the whole dataset for --probe-epochs epochs, with and without --cache-features:
  seconds per epoch, end to end, and whether history and head weights are identical.
* the bottleneck: images/s of hubtune's training loader alone (built as train() builds it, same workers), and of
  the GPU alone (the same model/optimizer step on a synthetic batch already on the GPU: fp32, bf16,
  bf16 + channels_last, and the latter with cudnn.benchmark on, which hubtune leaves off).

Data is generated on the fly (bench/data.py's Cats-vs-Dogs-like JPEGs, ~500x375, quality 90, 100 rows per parquet
row group/file) into a temporary folder; nothing is downloaded (HF_*_OFFLINE=1).

Run (GPU machine with 16 cores: ~150-190 s on an H200; stages that would overrun --budget s, default 390, are skipped):
    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out OUT_DIR
CPU smoke test of the script itself (resnet18, 64 px, a few steps; no fp16/compile):
    python bench/gpu_check.py --smoke --out /tmp/gpu_check
Writes OUT_DIR/gpu_check.json (everything) and OUT_DIR/gpu_check.md (summary table); both are rewritten after
every stage, so a run cut short still leaves its finished stages.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- setup, data


def setup_env(scratch: Path) -> None:
    """Offline Hub/datasets, caches in the scratch folder; must run before datasets/huggingface_hub are imported."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(scratch / "hf_home")
    os.environ["HF_DATASETS_CACHE"] = str(scratch / "hf_datasets")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_data(root: Path, files: int, rows: int, procs: int) -> Path:
    """`files` parquet files of `rows` generated images each (one row group per file when rows <= 100)."""
    from bench import data as bench_data

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"train-{i:05d}-of-{files:05d}.parquet", 0, i, rows, None) for i in range(files)]
    with ProcessPoolExecutor(max_workers=procs) as pool:
        list(pool.map(bench_data._shard, jobs))
    return root


def env_info() -> dict:
    import accelerate
    import datasets
    import huggingface_hub
    import PIL
    import pyarrow
    import timm
    import torch
    import torchdata
    import torchvision

    sources = b"".join(f.read_bytes() for f in sorted((ROOT / "hubtune").rglob("*.py")))
    info = {
        "hubtune_sources_sha1": hashlib.sha1(sources).hexdigest()[:12],  # which working tree state was measured
        "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
        "huggingface_hub": huggingface_hub.__version__, "torchdata": getattr(torchdata, "__version__", "?"),
        "pyarrow": pyarrow.__version__, "pillow": PIL.__version__, "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    return info


# ---------------------------------------------------------------------------------------------- measurement


def window(times: list[float], waits: list[float], sizes: list[int], warm: int) -> dict:
    """Images/s from the arrival of batch `warm` to the arrival of the last batch (steps warm .. n-2).

    times[i]: when batch i reached the loop; waits[i]: how long the loop waited for it; sizes[i]: its images.
    """
    n = len(times)
    if n < warm + 2:
        return {"img_s": None, "note": f"only {n} steps"}
    span = times[-1] - times[warm]
    images = sum(sizes[warm:-1])
    wait = sum(waits[warm + 1:])
    return {"img_s": round(images / span, 1), "window_steps": n - 1 - warm, "window_s": round(span, 3),
            "window_images": images, "ms_per_step": round(span / (n - 1 - warm) * 1e3, 2),
            "data_wait_frac": round(wait / span, 3), "first_steps_s": round(times[warm] - times[0], 2),
            "partial_batches_in_window": sum(1 for s in sizes[warm:-1] if s != max(sizes))}


STEP_LINE = re.compile(r"^step (\d+) \| .* \| data ([\d.]+)s")


class StepLog(logging.Handler):
    """Reads train()'s `step N | ... | data S` lines (log_every=1): when each step ended, how long the loop waited
    for its batch (S is the wait since the epoch began), and its size (every batch in the window is full)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(logging.INFO)
        self.batch_size = batch_size
        self.times: list[float] = []
        self.waits: list[float] = []
        self.sizes: list[int] = []
        self._waited = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        match = STEP_LINE.match(record.getMessage())
        if match:
            waited = float(match.group(2))
            self.times.append(time.perf_counter())
            self.waits.append(waited - self._waited)
            self.sizes.append(self.batch_size)
            self._waited = waited

    def __enter__(self) -> "StepLog":
        logging.getLogger("hubtune").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("hubtune").removeHandler(self)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------- hubtune runs


def hubtune_run(args: argparse.Namespace, data_dir: Path, out_dir: Path, **overrides: Any) -> dict:
    """One hubtune train() run; timing window, checks and the error (if any)."""
    import torch

    from hubtune.config import TrainConfig
    from hubtune.train import train

    reset_accelerate()
    free_memory()
    if overrides.get("compile"):
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
    cfg = TrainConfig(**{**dict(model=args.model, pretrained=False, dataset=str(data_dir), image_size=args.image_size,
                                batch_size=args.batch_size, epochs=1, max_steps=args.steps, num_workers=args.workers,
                                val_fraction=args.val_fraction, output_dir=str(out_dir), progress=False, seed=0,
                                log_every=1), **overrides})
    rec_steps = StepLog(args.batch_size)
    res: dict[str, Any] = {"config": {k: overrides.get(k) for k in overrides}}
    start = time.perf_counter()
    try:
        with rec_steps:
            result = train(cfg)
        res["ok"] = True
    except Exception as err:  # noqa: BLE001 - reported, the next variant still runs
        res.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        result = None
    res["wall_s"] = round(time.perf_counter() - start, 1)
    res["steps_done"] = len(rec_steps.times)
    res.update(window(rec_steps.times, rec_steps.waits, rec_steps.sizes, args.warm))
    res["peak_gpu_mem_gib"] = peak_gib()
    checks: dict[str, Any] = {}
    if result is not None:
        hist = [row.to_json() for row in result.history]  # metrics.json's rows
        record = result.metrics.to_json()
        checks["model_safetensors"] = (out_dir / "model.safetensors").is_file()
        checks["metrics_json"] = (out_dir / "metrics.json").is_file()
        checks["train_loss"] = hist[-1]["train_loss"] if hist else None
        checks["val_loss"] = hist[-1]["val_loss"] if hist else None
        checks["val_examples"] = hist[-1]["val_examples"] if hist else None
        checks["losses_finite"] = bool(hist) and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
                                                     for r in hist)
        checks["global_step"] = record.get("global_step")
        params = record.get("run_info", {}).get("parameters")
        if params:
            checks["parameters"] = params
    if result is not None:
        acc = result.accelerator
        checks["device"] = str(acc.device)
        checks["mixed_precision"] = acc.mixed_precision
        scaler = getattr(acc, "scaler", None)
        checks["grad_scaler"] = type(scaler).__name__ if scaler is not None else None
        if scaler is not None:
            checks["grad_scaler_final_scale"] = float(scaler.get_scale())
        models = getattr(acc, "_models", [])
        checks["prepared_model_type"] = type(models[0]).__name__ if models else None
    if overrides.get("compile"):
        from torch._dynamo.utils import counters

        checks["dynamo_unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        checks["dynamo_frames"] = dict(counters["frames"])
        checks["dynamo_graph_breaks"] = int(sum(counters["graph_break"].values()))
        checks["dynamo_graph_break_reasons"] = [str(k)[:200] for k in list(counters["graph_break"])[:5]]
    res["checks"] = checks
    res["ok"] = bool(res["ok"] and checks.get("model_safetensors") and checks.get("metrics_json")
                     and checks.get("losses_finite"))
    del result
    reset_accelerate()
    free_memory()
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints: ~300 MB per resnet50 run
    return res


def probe_runs(args: argparse.Namespace, data_dir: Path, scratch: Path) -> dict:
    """Linear probe (bench/linear_probe.py's probe_run: resnet18, every group but the head frozen, --freeze-bn,
    --no-augment, fp32) with and without --cache-features over the whole dataset: seconds per epoch, identical?"""
    from bench.linear_probe import probe_run

    runs = {}
    for name, cache in (("uncached", False), ("cached", True)):
        reset_accelerate()
        free_memory()
        runs[name] = probe_run(data_dir, scratch / f"probe-{name}", cache=cache, image_size=args.image_size,
                               batch_size=args.batch_size, epochs=args.probe_epochs, workers=args.workers)
        log(f"probe {name}: epochs {[round(x, 2) for x in runs[name]['epoch_s']]} s, "
            f"end to end {runs[name]['end_to_end_s']:.1f} s")
        shutil.rmtree(scratch / f"probe-{name}", ignore_errors=True)
    later = {k: sum(r["epoch_s"][1:]) / max(len(r["epoch_s"]) - 1, 1) for k, r in runs.items()}
    same = runs["cached"]["history"] == runs["uncached"]["history"]
    head_diff = max((runs["cached"]["head"][k] - v).abs().max().item() for k, v in runs["uncached"]["head"].items())
    return {"ok": same and head_diff == 0.0, "epochs": args.probe_epochs,
            "epoch_s": {k: [round(x, 2) for x in r["epoch_s"]] for k, r in runs.items()},
            "end_to_end_s": {k: round(r["end_to_end_s"], 1) for k, r in runs.items()},
            "later_epoch_speedup": round(later["uncached"] / later["cached"], 1),
            "end_to_end_speedup": round(runs["uncached"]["end_to_end_s"] / runs["cached"]["end_to_end_s"], 2),
            "identical_history": same, "head_max_abs_diff": head_diff,
            "train_examples": runs["cached"]["history"][0]["train_examples"]}


# ------------------------------------------------------------------------------------------- loader alone


def hubtune_loader_rate(args: argparse.Namespace, data_dir: Path) -> dict:
    """hubtune's training loader alone (built as train() builds it), consumed as fast as it yields."""
    import timm
    import torch

    from hubtune import data, stream
    from hubtune import model as model_lib
    from hubtune.config import TrainConfig
    from hubtune.job import dataset_source

    cfg = TrainConfig(model=args.model, pretrained=False, dataset=str(data_dir), image_size=args.image_size,
                      batch_size=args.batch_size, num_workers=args.workers, val_fraction=args.val_fraction, seed=0)
    train_src, _, info = data.open_splits(dataset_source(cfg))
    net = timm.create_model(args.model, pretrained=False, num_classes=len(info.class_names))
    train_tf, _ = model_lib.transforms(model_lib.data_config(net, args.image_size))
    ds = stream.ExampleStream(data.process_source(train_src, info, shuffle_seed=cfg.seed, rank=0, world_size=1),
                              train_tf, keep_val=False, val_fraction=cfg.val_fraction, seed=cfg.seed,
                              shuffle_buffer=cfg.shuffle_buffer)
    loader = stream.make_loader(ds, cfg.batch_size, cfg.num_workers, torch.cuda.is_available())
    times, waits, sizes = [], [], []
    it = iter(loader)
    while len(times) < args.steps:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        now = time.perf_counter()
        times.append(now), waits.append(now - start), sizes.append(len(batch.labels))
    del it, loader
    gc.collect()
    out = window(times, waits, sizes, args.warm)
    out.pop("data_wait_frac", None)
    out["workers_used"] = min(args.workers, ds.source.num_shards)
    return out


# ------------------------------------------------------------------------------------------- GPU alone


def gpu_only_rate(args: argparse.Namespace, mixed_precision: str, channels_last: bool, cudnn_benchmark: bool,
                  warm: int, measure: int) -> dict:
    """hubtune's step (forward, cross_entropy, backward, timm AdamW, loss.item()) on one synthetic batch on the GPU."""
    import timm
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    free_memory()
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        net = timm.create_model(args.model, pretrained=False, num_classes=2).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        opt = create_optimizer_v2(net, opt="adamw", lr=5e-4, weight_decay=0.05)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, generator=gen)
        x = x.contiguous(memory_format=fmt)
        y = torch.randint(0, 2, (args.batch_size,), device=device, generator=gen)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        times = []
        for _ in range(warm + measure + 1):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter())
        rate = measure * args.batch_size / (times[-1] - times[warm])
        return {"img_s": round(rate, 1), "ms_per_step": round(args.batch_size / rate * 1e3, 2),
                "peak_gpu_mem_gib": peak_gib(), "loss_finite": math.isfinite(loss.item())}
    finally:
        torch.backends.cudnn.benchmark = old
        free_memory()


# -------------------------------------------------------------------------------- plain Accelerate loop


def accelerate_loop_run(args: argparse.Namespace, files: list[str], transform_kind: str) -> dict:
    """cv_example-style loop: map-style datasets + per-image torchvision transforms + DataLoader + Accelerator."""
    import timm
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import OneCycleLR
    from torchvision import transforms as T

    from bench.accelerate_loop import make_loader

    reset_accelerate()
    free_memory()
    accelerator = Accelerator(mixed_precision="bf16")
    model = timm.create_model(args.model, pretrained=False, num_classes=2)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    if transform_kind == "cv_example":
        tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=(0.35, 1.0)), T.ToTensor(), T.Normalize(mean, std)])
    else:  # timm's training augmentation (hubtune's), per image in float: RRC, flip, ColorJitter, ToTensor, Normalize
        tf = timm.data.create_transform(**timm.data.resolve_data_config(
            {"input_size": (3, args.image_size, args.image_size)}, model=model), is_training=True)
    loader = make_loader(files, tf, args.batch_size, args.workers)
    model = model.to(accelerator.device)
    lr = 5e-4
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=lr / 25, weight_decay=0.05)
    sched = OneCycleLR(optimizer=optimizer, max_lr=lr, epochs=1, steps_per_epoch=len(loader))
    model, optimizer, loader, sched = accelerator.prepare(model, optimizer, loader, sched)
    sizes, waits, losses = [], [], []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    warm = min(args.warm, args.steps - 2)
    t_start = t_end = None
    model.train()
    it = iter(loader)
    start_all = time.perf_counter()
    for step in range(args.steps):
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - start)
        sizes.append(len(batch["label"]))
        outputs = model(batch["image"])
        loss = F.cross_entropy(outputs, batch["label"])
        accelerator.backward(loss)
        optimizer.step()
        sched.step()
        optimizer.zero_grad()
        # only the window's two ends are synchronous (cv_example never syncs; the steps between run ahead)
        if step == warm - 1:
            sync()
            t_start = time.perf_counter()
            losses.append(loss.item())
        elif step == args.steps - 1:
            sync()
            t_end = time.perf_counter()
            losses.append(loss.item())
    del it, loader
    gc.collect()
    if t_start is None or t_end is None:
        raise RuntimeError(f"only {len(sizes)} batches: the window steps {warm}..{args.steps} did not run")
    span = t_end - t_start
    n = len(sizes) - warm
    out = {"img_s": round(sum(sizes[warm:]) / span, 1), "window_steps": n, "window_s": round(span, 3),
           "ms_per_step": round(span / n * 1e3, 2), "data_wait_frac": round(sum(waits[warm:]) / span, 3),
           "first_steps_s": round(t_start - start_all, 2), "losses_finite": all(math.isfinite(v) for v in losses),
           "loss_last": losses[-1] if losses else None,
           "peak_gpu_mem_gib": peak_gib(), "transform": str(tf).replace("\n", " ")}
    del model, optimizer, sched, accelerator
    reset_accelerate()
    free_memory()
    return out


# ---------------------------------------------------------------------------------------------- reporting


def summary_md(results: dict) -> str:
    env = results.get("env", {})
    lines = ["# hubtune GPU check", ""]
    lines.append(f"- device: {env.get('gpu', 'cpu')} ({env.get('gpu_memory_gib', '-')} GiB, "
                 f"{env.get('sm_count', '-')} SMs), {env.get('cpu_count')} CPU cores")
    lines.append(f"- torch {env.get('torch')} (CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}), "
                 f"torchvision {env.get('torchvision')}, timm {env.get('timm')}, accelerate {env.get('accelerate')}, "
                 f"datasets {env.get('datasets')}, torchdata {env.get('torchdata')}, huggingface_hub "
                 f"{env.get('huggingface_hub')}, pyarrow {env.get('pyarrow')}, python {env.get('python')}")
    p = results.get("params", {})
    lines.append(f"- {p.get('model')} random init, {p.get('image_size')} px, batch {p.get('batch_size')}, "
                 f"{p.get('workers')} workers, {p.get('images')} generated JPEGs in {p.get('files')} parquet files; "
                 f"window = steps {p.get('warm')}..{p.get('steps')} (images/s), data wait = loop waiting for loader")
    lines += ["", "| variant | img/s | ms/step | data wait | peak GiB | wall s | ok | notes |",
              "|---|---:|---:|---:|---:|---:|---|---|"]

    def fmt(v: Any) -> str:
        return "-" if v is None else str(v)

    for name, r in results.get("runs", {}).items():
        wait = r.get("data_wait_frac")
        lines.append(f"| {name} | {fmt(r.get('img_s'))} | {fmt(r.get('ms_per_step'))} | "
                     f"{'-' if wait is None else f'{wait:.0%}'} | {fmt(r.get('peak_gpu_mem_gib'))} | "
                     f"{fmt(r.get('wall_s'))} | {'yes' if r.get('ok') else 'NO'} | {r.get('notes', '')} |")
    if results.get("bottleneck"):
        lines += ["", f"Bottleneck: {results['bottleneck']}"]
    errors = {n: r["error"] for n, r in results.get("runs", {}).items() if r.get("error")}
    if errors:
        lines += ["", "Errors:"] + [f"- {n}: {e}" for n, e in errors.items()]
    return "\n".join(lines) + "\n"


def notes_for(name: str, r: dict) -> str:
    c = r.get("checks", {})
    notes = []
    if "grad_scaler" in c and c.get("mixed_precision") == "fp16":
        notes.append(f"scaler {c['grad_scaler']} scale {c.get('grad_scaler_final_scale')}")
    if "dynamo_unique_graphs" in c:
        notes.append(f"dynamo graphs {c['dynamo_unique_graphs']}, breaks {c['dynamo_graph_breaks']}; steps before "
                     f"the window (compilation) took {r.get('first_steps_s')} s")
    if c.get("parameters") and c["parameters"].get("frozen"):
        notes.append(f"trainable {c['parameters'].get('trainable')}")
    if c.get("train_loss") is not None:
        notes.append(f"loss {c['train_loss']:.3f}/{c['val_loss']:.3f}")
    if "later_epoch_speedup" in r:
        notes.append(f"{r['epochs']} epochs of {r['train_examples']} images, seconds per epoch: uncached "
                     f"{r['epoch_s']['uncached']}, cached {r['epoch_s']['cached']}; epochs 2+ "
                     f"{r['later_epoch_speedup']}x faster, end to end {r['end_to_end_speedup']}x; identical history "
                     f"{r['identical_history']}, head max diff {r['head_max_abs_diff']}")
    if r.get("partial_batches_in_window"):
        notes.append(f"{r['partial_batches_in_window']} partial batches")
    return "; ".join(notes)


def write(out: Path, results: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.md").write_text(summary_md(results))


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized settings to test the script itself")
    p.add_argument("--model", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--files", type=int, default=None,
                   help="parquet files of --rows images (default 144: 12 per worker)")
    p.add_argument("--rows", type=int, default=None, help="images per file (<= 100: one row group each)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    p.add_argument("--warm", type=int, default=None, help="steps before the timing window")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--budget", type=float, default=None, help="seconds; stages that would not fit are skipped")
    p.add_argument("--probe-epochs", type=int, default=None, help="epochs of each linear-probe run")
    p.add_argument("--only", default=None, help="';'-separated stage names (exact) to run; the default runs all")
    args = p.parse_args(argv)
    defaults = (dict(model="resnet18", image_size=64, batch_size=8, workers=2, files=4, rows=16, steps=4, warm=1,
                     budget=600, probe_epochs=2) if args.smoke else
                dict(model="resnet50", image_size=224, batch_size=128, workers=12, files=144, rows=100, steps=100,
                     warm=30, budget=390, probe_epochs=4))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    setup_env(scratch)
    import logging

    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("hubtune").setLevel(logging.INFO)
    import torch

    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"params": {k: v for k, v in vars(args).items() if k != "out"}, "runs": {},
                               "command": " ".join([sys.executable, *sys.argv])}
    results["params"]["images"] = args.files * args.rows
    results["env"] = env_info()
    log(f"env: {json.dumps(results['env'])}")
    write(out, results)

    start = time.perf_counter()
    data_dir = make_data(scratch / "data", args.files, args.rows, min(os.cpu_count() or 2, 16))
    files = sorted(str(f) for f in data_dir.glob("*.parquet"))
    from bench import data as bench_data

    results["data"] = {"gen_s": round(time.perf_counter() - start, 1), **bench_data.stats(data_dir)}
    log(f"data: {results['data']}")
    write(out, results)

    def hub(name: str, **overrides: Any) -> tuple[str, Callable[[], dict], float]:
        need = 100.0 if overrides.get("compile") else 20.0
        return name, lambda: hubtune_run(args, data_dir, scratch / "run", **overrides), need

    def gpu(name: str, mp: str, cl: bool, bench_: bool) -> tuple[str, Callable[[], dict], float]:
        warm, measure = (1, 2) if args.smoke else (10, 30)
        return name, lambda: gpu_only_rate(args, mp, cl, bench_, warm, measure), 5.0

    def acc(name: str, kind: str) -> tuple[str, Callable[[], dict], float]:
        return name, lambda: accelerate_loop_run(args, files, kind), 15.0

    stages: list[tuple[str, Callable[[], dict], float]] = [  # the budget may cut the tail (compile: slowest)
        ("hubtune loader alone", lambda: hubtune_loader_rate(args, data_dir), 8.0),
        gpu("GPU alone, fp32", "no", False, False),
        gpu("GPU alone, bf16", "bf16", False, False),
        gpu("GPU alone, bf16 + channels_last", "bf16", True, False),
        gpu("GPU alone, bf16 + channels_last + cudnn.benchmark", "bf16", True, True),
        # channels_last is hubtune's default on CUDA: the runs without it say so explicitly
        hub("hubtune bf16", mixed_precision="bf16", channels_last=False),
        hub("hubtune fp32 (no)", mixed_precision="no", channels_last=False),
        hub("hubtune fp16", mixed_precision="fp16", channels_last=False),
        hub("hubtune bf16 + channels_last", mixed_precision="bf16", channels_last=True),
        # --decode-device cuda (never run on a GPU yet): the workers only read bytes and plan
        hub("hubtune bf16 + channels_last, --decode-device cuda", mixed_precision="bf16", channels_last=True,
            decode_device="cuda"),
        hub("hubtune bf16 + channels_last, --decode-device cuda, 4 workers", mixed_precision="bf16",
            channels_last=True, decode_device="cuda", num_workers=4),
        hub("hubtune frozen backbone (stem,stages + freeze_bn), bf16", mixed_precision="bf16",
            freeze="stem,stages", freeze_bn=True, channels_last=False),
        acc("accelerate loop bf16 (timm aug, ToTensor+Normalize per image)", "timm"),
        acc("accelerate loop bf16 (cv_example transform)", "cv_example"),
        hub("hubtune bf16 + channels_last + compile", mixed_precision="bf16", channels_last=True, compile=True),
        ("linear probe resnet18, uncached vs --cache-features", lambda: probe_runs(args, data_dir, scratch), 60.0),
    ]
    if not cuda:  # fp16 autocast and inductor are GPU checks; the smoke test skips them
        skip = ("hubtune fp16", "hubtune bf16 + channels_last + compile",
                "hubtune bf16 + channels_last, --decode-device cuda",
                "hubtune bf16 + channels_last, --decode-device cuda, 4 workers")
        stages = [st for st in stages if st[0] not in skip]
        results["skipped_on_cpu"] = list(skip)
    only = {s.strip() for s in args.only.split(";")} if args.only else None
    from bench.accelerate_loop import make_loader

    make_loader(files, lambda x: x, 1, 0)  # builds the map-style dataset's Arrow cache outside the timed runs
    for name, fn, need in stages:
        if only and name not in only:
            continue
        left = args.budget - (time.perf_counter() - T0)
        if left < need:
            results["runs"][name] = {"ok": False, "skipped": f"budget: {left:.0f} s left, needs ~{need:.0f} s"}
            log(f"skip {name}: {left:.0f} s left")
            write(out, results)
            continue
        log(f"run {name}")
        try:
            r = fn()
            r.setdefault("ok", r.get("img_s") is not None)
        except Exception as err:  # noqa: BLE001
            r = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        r["notes"] = notes_for(name, r)
        results["runs"][name] = r
        log(f"{name}: " + json.dumps({k: v for k, v in r.items() if k not in ("traceback", "transform")},
                                     default=str))
        write(out, results)

    runs = results["runs"]
    loader = runs.get("hubtune loader alone", {}).get("img_s")
    gpu_bf16 = runs.get("GPU alone, bf16", {}).get("img_s")
    gpu_cl = runs.get("GPU alone, bf16 + channels_last", {}).get("img_s")
    train_bf16 = runs.get("hubtune bf16", {}).get("img_s")
    if loader and gpu_bf16:
        bound = "input pipeline" if loader < gpu_bf16 else "GPU"
        results["bottleneck"] = (
            f"{bound} (bf16): hubtune's training loader alone yields {loader} img/s with {args.workers} workers; "
            f"the GPU alone does {gpu_bf16} img/s in bf16 ({gpu_cl} with channels_last); hubtune bf16 trains at "
            f"{train_bf16} img/s")
    write(out, results)
    print(summary_md(results), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    failed = [n for n, r in runs.items() if not r.get("ok") and not r.get("skipped")]
    log(f"done in {time.perf_counter() - T0:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
