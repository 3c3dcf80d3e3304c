"""Fine-tune a timm image classifier on a streamed dataset with Accelerate.

Run it as `accelerate launch hubtune/train.py ...`, `python -m hubtune.train ...` or `hubtune train ...`.
The file runs as a script with hubtune/ first on sys.path, so imports here are absolute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from hubtune import data, metrics
from hubtune import model as model_lib
from hubtune.config import CONFIG_FILE, TrainConfig

logger = get_logger("hubtune")
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


class BadDataError(RuntimeError):
    """Too many images could not be decoded."""


def synced_batches(loader: Any, accelerator: Accelerator, counts: dict[str, int]) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, is_last) and stop on every process as soon as any process runs out of data.

    Shards of a stream hold different numbers of examples, so processes agree before each step that all
    of them have a batch; otherwise DDP would wait forever for the process that has finished.
    """

    def fetch(it: Iterator) -> dict | None:
        for batch in it:
            counts["bad"] += batch["n_bad"]
            counts["seen"] += batch["n_bad"] + len(batch["labels"])
            if batch["pixel_values"] is not None:
                return batch
        return None

    def all_have(batch: dict | None) -> bool:
        flag = torch.tensor([batch is not None], dtype=torch.int32, device=accelerator.device)
        return bool(accelerator.gather(flag).min()) if accelerator.num_processes > 1 else batch is not None

    it = iter(loader)
    current = fetch(it)
    ok = all_have(current)
    while ok:
        upcoming = fetch(it)
        ok_next = all_have(upcoming)
        yield current, not ok_next
        current, ok = upcoming, ok_next


def sum_over_processes(accelerator: Accelerator, *values: float) -> list[float]:
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local).tolist()


def check_bad_fraction(bad: int, seen: int, limit: float, what: str) -> None:
    """Stop the run when more than `limit` of the images (counted over all processes) were unreadable."""
    if seen and bad / seen > limit:
        raise BadDataError(
            f"{bad} of {seen} {what} images ({bad / seen:.1%}) could not be decoded, over "
            f"--max-bad-fraction {limit}; fix the data or raise the limit"
        )


def steps_per_epoch_hint(cfg: TrainConfig, info: data.DataInfo, world_size: int) -> int | None:
    if info.train_size_hint is None:
        return None
    n = info.train_size_hint * (1 - cfg.val_fraction if info.val_source.startswith("hash") else 1)
    return max(1, math.ceil(n / (cfg.batch_size * world_size * cfg.grad_accum)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int | None) -> CosineLRScheduler:
    # an unknown length (no split size in the metadata) holds the peak lr until the first epoch has counted it
    t_initial = total_steps or 10**9
    return CosineLRScheduler(optimizer, t_initial=t_initial, warmup_t=cfg.warmup_steps, warmup_lr_init=0.0,
                             t_in_epochs=False, lr_min=0.0)


def _cpu_only_launch() -> bool:
    """True when a multi-process launcher (torchrun, `accelerate launch --multi_gpu`) started us without GPUs.

    Accelerate then treats every process as a lone single-process run unless told to use the CPU, and each
    would train and write the outputs on its own; with cpu=True they form one gloo process group instead.
    """
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole fine-tuning job described by `cfg` and write the Hub-ready export to cfg.output_dir."""
    # --- setup
    cfg.validate()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=_cpu_only_launch())
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    start_time = time.time()

    # --- data
    train_src, val_src, info = data.open_splits(cfg)
    class_names = info.class_names
    logger.info(f"dataset {cfg.dataset}: classes {class_names}, validation from {info.val_source}")

    # --- model
    net = model_lib.create(cfg.model, num_classes=len(class_names), pretrained=cfg.pretrained)
    frozen = model_lib.resolve_freeze(net, cfg.freeze) if cfg.freeze else []
    model_lib.freeze(net, frozen, cfg.freeze_bn)  # before DDP wraps it: no find_unused_parameters needed
    logger.info("parameters:\n" + model_lib.format_table(model_lib.parameter_table(net)))
    data_cfg = model_lib.data_config(net, cfg.image_size)
    train_tf, eval_tf = model_lib.transforms(data_cfg)
    common = dict(info=info, val_fraction=cfg.val_fraction, rank=accelerator.process_index,
                  world_size=accelerator.num_processes)
    hashed = info.val_source.startswith("hash")
    train_ds = data.build_stream(train_src, transform=train_tf, keep_val=False if hashed else None,
                                 shuffle_seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, **common)
    val_ds = data.build_stream(val_src, transform=eval_tf, keep_val=True if hashed else None, **common)
    pin = accelerator.device.type == "cuda"
    train_loader = data.make_loader(train_ds, cfg.batch_size, cfg.num_workers, pin)
    val_loader = data.make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin)

    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"--freeze {cfg.freeze!r} leaves no trainable parameters")
    optimizer = create_optimizer_v2(net, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)  # timm skips frozen parameters
    # the loaders are not prepared: each process already reads its own shard (see data.build_stream)
    net, optimizer = accelerator.prepare(net, optimizer)
    steps_per_epoch = steps_per_epoch_hint(cfg, info, accelerator.num_processes)
    total_steps = cfg.max_steps or (steps_per_epoch * cfg.epochs if steps_per_epoch else None)
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    # --- loop
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    global_step = 0
    examples_seen = 0
    skipped = {"train": 0, "val": 0}
    for epoch in range(cfg.epochs):
        train_ds.set_epoch(epoch)
        net.train()
        counts = {"bad": 0, "seen": 0}
        loss_sum = 0.0
        n_local = 0
        micro = 0
        bar = _progress(cfg, accelerator, steps_per_epoch, epoch)
        t0 = time.time()
        for batch, is_last in synced_batches(train_loader, accelerator, counts):
            x = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            y = batch["labels"].to(accelerator.device, non_blocking=True)
            micro += 1
            sync = micro % cfg.grad_accum == 0 or is_last
            with accelerator.no_sync(net) if not sync else contextlib.nullcontext():
                loss = F.cross_entropy(net(x).float(), y)
                accelerator.backward(loss / cfg.grad_accum)
            loss_all = accelerator.gather(loss.detach()) if accelerator.num_processes > 1 else loss.detach()
            if not torch.isfinite(loss_all).all():
                raise FloatingPointError(
                    f"loss became {loss_all.tolist()} at step {global_step + 1} (epoch {epoch + 1}); "
                    f"try --mixed-precision bf16 or a lower --lr (now {cfg.lr})"
                )
            loss_sum += loss.item() * len(y)
            n_local += len(y)
            if not sync:
                continue
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(net.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            scheduler.step_update(num_updates=global_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_all.mean().item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{n_local * accelerator.num_processes / (time.time() - t0):.0f}")
            if global_step % cfg.log_every == 0:
                logger.info(f"step {global_step} | loss {loss_all.mean().item():.4f} | "
                            f"lr {optimizer.param_groups[0]['lr']:.2e}")
            if cfg.max_steps and global_step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        # --- eval
        loss_total, n_total, n_bad, n_seen = sum_over_processes(
            accelerator, loss_sum, n_local, counts["bad"], counts["seen"])
        check_bad_fraction(int(n_bad), int(n_seen), cfg.max_bad_fraction, "training")
        epoch_examples = int(n_total)
        examples_seen += epoch_examples
        skipped["train"] = int(n_bad)
        if steps_per_epoch is None and epoch == 0 and not cfg.max_steps:
            steps_per_epoch = global_step
            scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
            scheduler.step_update(num_updates=global_step)
        val = metrics.evaluate(accelerator.unwrap_model(net), val_loader, accelerator, class_names)
        check_bad_fraction(val["skipped"], val["skipped"] + val["examples"], cfg.max_bad_fraction, "validation")
        skipped["val"] = val["skipped"]
        row = {"epoch": epoch + 1, "step": global_step, "train_loss": loss_total / max(epoch_examples, 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
               "train_examples": epoch_examples, "val_examples": val["examples"], "per_class": val["per_class"],
               "confusion_matrix": val["confusion_matrix"]}
        history.append(row)
        if not best or row["val_accuracy"] > best["val_accuracy"]:
            best = row
        logger.info(f"epoch {epoch + 1}/{cfg.epochs} | step {global_step} | train_loss {row['train_loss']:.4f} | "
                    f"val_loss {row['val_loss']:.4f} | val_acc {row['val_accuracy']:.4f} | val_f1 {row['val_f1']:.4f}"
                    f" | {epoch_examples} train / {val['examples']} val images | {time.time() - t0:.1f}s")
        if cfg.max_steps and global_step >= cfg.max_steps:
            break

    # --- save
    accelerator.wait_for_everyone()
    result_metrics = {
        "history": history,
        "best": best,
        "train_examples": history[-1]["train_examples"] if history else 0,
        "val_examples": history[-1]["val_examples"] if history else 0,
        "examples_seen": examples_seen,
        "skipped_images": skipped,
        "global_step": global_step,
        "class_names": class_names,
        "dataset_revision": info.revision,
        "num_processes": accelerator.num_processes,
        "wall_time_s": round(time.time() - start_time, 2),
    }
    if accelerator.is_main_process:
        model_lib.export(accelerator.unwrap_model(net), out, class_names, data_cfg)
        (out / METRICS_FILE).write_text(json.dumps(result_metrics, indent=2))
        logger.info(f"exported to {out} (config.json, model.safetensors, {METRICS_FILE}, {CONFIG_FILE})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=out, history=history, best=best, metrics=result_metrics)


def _progress(cfg: TrainConfig, accelerator: Accelerator, total: int | None, epoch: int) -> Any:
    if not (cfg.progress and accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags into a TrainConfig, train, turn errors into one-line messages."""
    from hubtune.cli import run_guarded
    from hubtune.config import parse

    logging.basicConfig(format="%(message)s", level=logging.INFO)
    return run_guarded(lambda: train(parse(argv)) and 0)


if __name__ == "__main__":
    sys.exit(main())
