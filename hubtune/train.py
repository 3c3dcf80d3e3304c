"""Fine-tune a timm image classifier on a streamed dataset with Accelerate.

Run it as `accelerate launch hubtune/train.py ...`, `python -m hubtune.train ...` or `hubtune train ...`.
The file runs as a script with hubtune/ first on sys.path, so imports here are absolute.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from hubtune import checkpoint, data, features, hub, metrics, report, stream
from hubtune import model as model_lib
from hubtune.config import CONFIG_FILE, TrainConfig
from hubtune.run_state import RunState, StopRequest, TrainingInterrupted, restore, save_checkpoint, update_best

logger = get_logger("hubtune")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]
    metrics: dict[str, Any]


class BadDataError(RuntimeError):
    """Too many images could not be decoded."""


def synced_batches(loader: Any, accelerator: Accelerator, fetched: dict) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, is_last) and stop on every process as soon as any process runs out of data.

    Shards of a stream hold different numbers of examples, so processes agree before each step that all
    of them have a batch; otherwise DDP would wait forever for the process that has finished. Each batch
    carries the loader position and decode counters after it, so a checkpoint never includes the batch fetched
    ahead; `fetched` counts everything the loader produced (the epoch totals). When the stream stops,
    `fetched["rest"]` holds the batches this process still had (the batch fetched ahead, then the loader's rest).
    """

    def fetch(it: Iterator) -> dict | None:
        for batch in it:
            fetched["bad"] += batch["n_bad"]
            fetched["seen"] += batch["n_bad"] + len(batch["labels"])
            if len(batch["labels"]):
                batch["position"] = {"loader": loader.state_dict(), "bad": fetched["bad"], "seen": fetched["seen"]}
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
        if not ok_next:  # set before the last yield: the caller may not resume this generator after it
            fetched["rest"] = itertools.chain([upcoming] if upcoming is not None else [], it)
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


def make_scheduler(optimizer: Any, cfg: TrainConfig, state: RunState) -> CosineLRScheduler:
    """Warmup + cosine over optimizer steps, positioned at state.global_step."""
    total = cfg.max_steps or (state.steps_per_epoch * cfg.epochs if state.steps_per_epoch else None)
    # an unknown length (no split size in the metadata) holds the peak lr until the first epoch has counted it
    scheduler = CosineLRScheduler(optimizer, t_initial=total or 10**9, warmup_t=cfg.warmup_steps,
                                  warmup_lr_init=0.0, t_in_epochs=False, lr_min=0.0)
    if state.global_step:
        scheduler.step_update(num_updates=state.global_step)
    return scheduler


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole fine-tuning job described by `cfg` and write the Hub-ready export to cfg.output_dir."""
    # --- setup
    cfg.validate()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=_cpu_only_launch(),
                              dynamo_backend=cfg.compile_backend if cfg.compile else None)
    if cfg.compile and accelerator.state.dynamo_plugin.backend.value == "NO":
        raise RuntimeError("--compile: Accelerate was already set up in this process without torch.compile; "
                           "run training in a new process (hubtune train, accelerate launch)")
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    resume_from = checkpoint.find_resume(out, cfg.resume) if cfg.resume else None
    if cfg.resume and resume_from is None:
        logger.info(f"--resume latest: no checkpoint in {out}, starting fresh")
    start_time = time.time()

    # --- data
    train_src, val_src, info = data.open_splits(cfg)
    class_names = info.class_names
    logger.info(f"dataset {cfg.dataset}: classes {class_names}, validation from {info.val_source}")

    # --- model (base model and dataset pinned to commit shas, recorded in train_config.yaml)
    spec = cfg.model if "@" in cfg.model or not cfg.model_revision else f"{cfg.model}@{cfg.model_revision}"
    timm_name, base_model = hub.resolve_model(spec) if cfg.pretrained else (cfg.model, {"id": None})
    cfg.model_revision = base_model.get("revision") or cfg.model_revision
    cfg.dataset_revision = info.revision or cfg.dataset_revision
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    net = model_lib.create(timm_name, num_classes=len(class_names), pretrained=cfg.pretrained)
    frozen = model_lib.resolve_freeze(net, cfg.freeze) if cfg.freeze else []
    model_lib.freeze(net, frozen, cfg.freeze_bn)  # before DDP wraps it: no find_unused_parameters needed
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"--freeze {cfg.freeze!r} leaves no trainable parameters")
    if cfg.cache_features:
        features.check_cacheable(net)
    logger.info("parameters:\n" + model_lib.format_table(model_lib.parameter_table(net)))
    data_cfg = model_lib.data_config(net, cfg.image_size)
    train_tf, eval_tf = model_lib.transforms(data_cfg)  # uint8 tensors; `prepare` normalizes whole batches
    train_tf = train_tf if cfg.augment else eval_tf
    prepare = model_lib.Normalize(data_cfg, accelerator.device, channels_last=cfg.channels_last)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    where = dict(rank=accelerator.process_index, world_size=accelerator.num_processes)
    hashed = info.val_source.startswith("hash")
    train_ds = stream.ExampleStream(data.process_source(train_src, info, shuffle_seed=cfg.seed, **where), train_tf,
                                    keep_val=False if hashed else None, val_fraction=cfg.val_fraction,
                                    seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    val_ds = stream.ExampleStream(data.process_source(val_src, info, shuffle_seed=None, **where), eval_tf,
                                  keep_val=True if hashed else None, val_fraction=cfg.val_fraction, seed=None,
                                  shuffle_buffer=cfg.shuffle_buffer)
    if cfg.jpeg_draft:
        val_ds.draft = model_lib.resize_size(eval_tf)
    cache = None
    if cfg.cache_features:
        cache = features.FeatureCache(Path(cfg.feature_cache_dir or features.default_dir()),
                                      features.fingerprint(cfg, net, data_cfg, train_tf, eval_tf), **where)
        train_ds.views = cfg.cache_views
    pin = accelerator.device.type == "cuda"
    train_loader = stream.make_loader(train_ds, cfg.batch_size, cfg.num_workers, pin, cfg.persistent_workers)
    val_loader = stream.make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin, cfg.persistent_workers)

    optimizer = create_optimizer_v2(net, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)  # timm skips frozen parameters
    # the loaders are not prepared: each process already reads its own shard (see data.process_source).
    # With cached features each step runs only the classifier, so only the classifier is prepared (DDP, autocast).
    # `net` and `head` stay the modules themselves (prepare wraps them for DDP/compile and patches in autocast):
    # saving, exporting and evaluating use them, never the wrappers.
    head = net if cache is None else net.get_classifier()
    net.to(accelerator.device)
    stepped, optimizer = accelerator.prepare(head, optimizer)

    def backbone(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), accelerator.autocast():
            return features.backbone_features(net, prepare(pixels))

    def logits(module: torch.nn.Module, batch: dict, view: str | None) -> torch.Tensor:
        """The batch's logits through `module`: `stepped` in training, its unwrapped `head` in evaluation."""
        if cache is None:
            return module(prepare(batch["pixel_values"]))
        return module(cache.features(view, batch, backbone, accelerator.device))

    run = {"dataset_revision": info.revision, "class_names": class_names, "val_source": info.val_source,
           "num_processes": accelerator.num_processes, "frozen_parameters": frozen}
    state = RunState(steps_per_epoch=steps_per_epoch_hint(cfg, info, accelerator.num_processes))
    progress = {"loss_sum": 0.0, "n": 0, "bad": 0, "seen": 0, "loader": None}
    if resume_from is not None:
        state, progress = restore(resume_from, accelerator, net, optimizer, cfg, run)
    scheduler = make_scheduler(optimizer, cfg, state)
    save_every = None if cfg.save_every == "epoch" else int(cfg.save_every)
    command = report.resume_command()
    run_info = report.run_info(cfg, accelerator, net, frozen, base_model, info, command)
    pusher = _background_pusher(cfg) if cfg.push_every_save and accelerator.is_main_process else None

    # --- loop
    with StopRequest() as stop:
        while state.epoch < cfg.epochs and state.stopped is None and not _reached_max_steps(cfg, state):
            resumed = state.in_epoch and progress["loader"] is not None
            if resumed:
                train_loader.load_state_dict(progress["loader"])
            else:
                train_ds.set_epoch(state.epoch)
                progress = {"loss_sum": 0.0, "n": 0, "bad": 0, "seen": 0, "loader": None}
            view = features.view_for(cfg, state.epoch) if cache else None
            if cache and cache.begin(view, train_ds, accelerator, fresh=not resumed):
                logger.info(f"epoch {state.epoch + 1}: training the classifier on cached features ({view})")
            state.in_epoch = True
            net.train()
            bar = _progress_bar(cfg, accelerator, state)
            t0, micro = time.time(), 0
            fetched = {"bad": progress["bad"], "seen": progress["seen"]}
            whole_pass = False
            for batch, is_last in synced_batches(train_loader, accelerator, fetched):
                y = batch["labels"].to(accelerator.device, non_blocking=True)
                micro += 1
                sync = micro % cfg.grad_accum == 0 or is_last
                with contextlib.nullcontext() if sync else accelerator.no_sync(stepped):
                    loss = F.cross_entropy(logits(stepped, batch, view).float(), y)
                    accelerator.backward(loss / cfg.grad_accum)
                signals = torch.tensor([loss.item(), float(stop.signum or 0)], device=accelerator.device)
                signals = accelerator.gather(signals[None]) if accelerator.num_processes > 1 else signals[None]
                if not torch.isfinite(signals[:, 0]).all():
                    raise FloatingPointError(
                        f"loss became {signals[:, 0].tolist()} at step {state.global_step + 1} (epoch "
                        f"{state.epoch + 1}); try --mixed-precision bf16 or a lower --lr (now {cfg.lr})")
                progress["loss_sum"] += loss.item() * len(y)
                progress["n"] += len(y)
                if not sync:
                    continue
                if cfg.clip_grad:
                    accelerator.clip_grad_norm_(net.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                scheduler.step_update(num_updates=state.global_step)
                lr = optimizer.param_groups[0]["lr"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{signals[:, 0].mean():.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{progress['n'] * accelerator.num_processes / (time.time() - t0):.0f}")
                if state.global_step % cfg.log_every == 0:
                    logger.info(f"step {state.global_step} | loss {signals[:, 0].mean():.4f} | lr {lr:.2e}")
                progress.update(batch["position"])
                whole_pass = is_last
                done = is_last or _reached_max_steps(cfg, state)
                requested = int(signals[:, 1].max())
                if requested or (save_every and state.global_step % save_every == 0 and not done):
                    path = save_checkpoint(accelerator, out, net, optimizer, state, progress, cfg, run)
                    if requested:
                        raise TrainingInterrupted(requested, path, command)
                if done:
                    break
            if bar is not None:
                bar.close()
            if cache:  # a pass that reached the end computes the features of the batches ranks could not share
                cache.end(view, accelerator, whole_pass, fetched.get("rest", ()), backbone)

            # --- eval
            loss_total, n_total, n_bad, n_seen = sum_over_processes(
                accelerator, progress["loss_sum"], progress["n"], fetched["bad"], fetched["seen"])
            check_bad_fraction(int(n_bad), int(n_seen), cfg.max_bad_fraction, "training")
            state.examples_seen += int(n_total)
            if state.epoch == 0 and not cfg.max_steps and steps_per_epoch_hint(cfg, info, 1) is None:
                state.steps_per_epoch = state.global_step  # learned: the schedule now spans all epochs
                scheduler = make_scheduler(optimizer, cfg, state)
            if cache:
                cache.begin("val", val_ds, accelerator)
            net.eval()  # `head` is unwrapped: DDP would sync buffers on every forward, and shards end unevenly
            val = metrics.evaluate(lambda b: logits(head, b, "val"), val_loader, accelerator, class_names)
            net.train()
            if cache:
                cache.end("val", accelerator, whole_pass=True)
            check_bad_fraction(val["skipped"], val["skipped"] + val["examples"], cfg.max_bad_fraction, "validation")
            row = {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": loss_total / max(n_total, 1),
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
                   "train_examples": int(n_total), "val_examples": val["examples"], "per_class": val["per_class"],
                   "confusion_matrix": val["confusion_matrix"],
                   "skipped_images": {"train": int(n_bad), "val": val["skipped"]}}
            state.history.append(row)
            improved = update_best(state, row, cfg)
            if improved:
                state.best["checkpoint"] = checkpoint.step_dir(out, state.global_step).name
            logger.info(f"epoch {row['epoch']}/{cfg.epochs} | step {row['step']} | train_loss {row['train_loss']:.4f}"
                        f" | val_loss {row['val_loss']:.4f} | val_acc {row['val_accuracy']:.4f} | val_f1 "
                        f"{row['val_f1']:.4f} | {row['train_examples']} train / {row['val_examples']} val images | "
                        f"{time.time() - t0:.1f}s")
            state.epoch += 1
            state.in_epoch = False
            if state.stopped:
                logger.info(f"early stopping: {state.stopped['detail']}")
            save_checkpoint(accelerator, out, net, optimizer, state, progress, cfg, run)
            if pusher is not None and improved:
                snap = hub.snapshot_dir(out)
                report.write_outputs(snap, net, cfg, data_cfg,
                               report.final_metrics(state, info, accelerator, start_time, run_info))
                pusher.submit(snap)

    # --- save
    if state.stopped is None:
        reason, detail = (("max_steps", f"reached --max-steps {cfg.max_steps}") if _reached_max_steps(cfg, state)
                          else ("max_epochs", f"completed --epochs {cfg.epochs}"))
        state.stopped = {"reason": reason, "epoch": state.epoch, "step": state.global_step, "detail": detail}
    result_metrics = report.final_metrics(state, info, accelerator, start_time, run_info)
    if accelerator.is_main_process:
        best_weights = load_file(str(out / checkpoint.CHECKPOINTS / state.best["checkpoint"] / checkpoint.MODEL_FILE))
        net.load_state_dict(best_weights)
        report.write_outputs(out, net, cfg, data_cfg, result_metrics)
        logger.info(f"exported the best checkpoint ({state.best['checkpoint']}, epoch {state.best['epoch']}, "
                    f"{cfg.metric} {state.best[cfg.metric]:.4f}) to {out}")
        if pusher is not None:
            pusher.close()
        if cfg.push_to_hub:
            hub.push(out, cfg.push_to_hub, private=cfg.private, revision=cfg.revision,
                     commit_message=cfg.commit_message, push_checkpoints=cfg.push_checkpoints,
                     overwrite_card=cfg.overwrite_card)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=out, history=state.history, best=state.best, metrics=result_metrics)


def _background_pusher(cfg: TrainConfig) -> hub.BackgroundPusher:
    return hub.BackgroundPusher(cfg.push_to_hub, private=cfg.private, revision=cfg.revision,
                                commit_message="hubtune: new best checkpoint", overwrite_card=cfg.overwrite_card)


def _reached_max_steps(cfg: TrainConfig, state: RunState) -> bool:
    return bool(cfg.max_steps) and state.global_step >= cfg.max_steps


def _cpu_only_launch() -> bool:
    """True when a multi-process launcher (torchrun, `accelerate launch --multi_gpu`) started us without GPUs.

    Accelerate then treats every process as a lone single-process run unless told to use the CPU, and each
    would train and write the outputs on its own; with cpu=True they form one gloo process group instead.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _progress_bar(cfg: TrainConfig, accelerator: Accelerator, state: RunState) -> Any:
    if not (cfg.progress and accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
                dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags into a TrainConfig, train, turn errors into one-line messages."""
    from hubtune.cli import run_guarded, setup_logging
    from hubtune.config import parse

    setup_logging()
    return run_guarded(lambda: train(parse(argv)) and 0)


if __name__ == "__main__":
    sys.exit(main())
