"""Fine-tune a timm image classifier on a streamed dataset with Accelerate.

Run it as `accelerate launch hubtune/train.py ...`, `python -m hubtune.train ...` or `hubtune train ...`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `accelerate launch hubtune/train.py` and `python -m hubtune.train` execute this file as __main__, beside the
    # package's own hubtune.train: hand over to the package module before defining anything here, so that every
    # class (the errors the entry point catches among them) exists once. A script's folder comes first on sys.path;
    # it is hubtune/ itself, whose modules must not shadow top-level packages.
    from pathlib import Path

    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))  # a checkout that is not pip-installed still imports hubtune
    # `hubtune train`: flags are parsed before torch and friends are imported (--help and a mistyped flag answer in
    # well under a second), errors become one line
    from hubtune.cli import main as _main

    sys.exit(_main(["train", *sys.argv[1:]]))

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hubtune import calibration, checkpoint, device_decode, features, hub, metrics, report, unfreeze
from hubtune.config import TrainConfig
from hubtune.errors import (
    CheckpointError,
    DivergedError,
    TrainingInterrupted,
    check_bad_fraction,
    get_logger,
)
from hubtune.files import CHECKPOINTS_DIR
from hubtune.job import Job, build_job, push_target
from hubtune.records import (
    BestRecord,
    EpochRow,
    ExportFallback,
    RunRecord,
    Skipped,
    StopRecord,
    ValMetrics,
)
from hubtune.run_state import BestPolicy, EpochProgress, RunState, StopRequest, save_checkpoint, update_best
from hubtune.schedule import make_scheduler, steps_per_epoch_hint
from hubtune.stream import Batch

logger = get_logger("hubtune")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[EpochRow]
    best: BestRecord | None
    metrics: RunRecord
    accelerator: Accelerator  # the run's own, for callers that inspect devices, the grad scaler or prepared models


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole fine-tuning job described by `cfg` and write the Hub-ready export to cfg.output_dir."""
    # --- setup: accelerator, data, model, loaders, optimizer, resume (hubtune.job)
    job = build_job(cfg)
    cfg, accelerator, state = job.cfg, job.accelerator, job.state

    # --- loop
    with StopRequest() as stop, background_threads_end(job):
        while state.epoch < cfg.epochs and state.stopped is None and not reached_max_steps(cfg, state):
            view = begin_epoch(job)
            bar = _progress_bar(cfg, accelerator, state)
            t0, micro, waited, whole_pass = time.time(), 0, 0.0, False
            fetched = EpochProgress(bad=job.progress.bad, seen=job.progress.seen)
            smallest = 2 if job.cache is None and trains_batchnorm(job.stepped) else 1
            for batch, is_last in synced_batches(job.train_loader, accelerator, fetched, smallest):
                micro += 1
                sync = micro % cfg.grad_accum == 0 or is_last
                with contextlib.nullcontext() if sync else accelerator.no_sync(job.stepped):
                    inputs, targets = job.train_inputs(batch, view)
                    loss = job.loss(job.stepped(inputs), targets)
                    accelerator.backward(loss / cfg.grad_accum)
                mean_loss, requested = agree_on_step(accelerator, loss, stop.signum, state)
                job.progress.add(loss.item(), len(targets))
                if not sync:
                    continue
                if cfg.clip_grad:
                    accelerator.clip_grad_norm_(job.net.parameters(), cfg.clip_grad)
                job.optimizer.step()
                job.optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                job.scheduler.step_update(num_updates=state.global_step)
                if job.ema is not None:
                    job.ema.update(job.net, step=state.global_step)

                waited += batch.waited
                log_step(job, bar, mean_loss, t0, waited)
                job.progress.advance(batch.position)
                whole_pass = is_last
                done = is_last or reached_max_steps(cfg, state)
                if requested or (cfg.save_steps and state.global_step % cfg.save_steps == 0 and not done):
                    path = save_checkpoint(job)
                    if requested:
                        raise TrainingInterrupted(requested, path, job.command, hub=finish_uploads(job, path))
                if done:
                    break
            if bar is not None:
                bar.close()
            if job.cache:  # a pass that reached the end computes the features of the batches ranks could not share
                job.cache.end(view, accelerator, whole_pass, fetched.rest, job.backbone)

            # --- eval, history, best, early stopping, checkpoint
            end_epoch(job, fetched, time.time() - t0)

    # --- save: the best checkpoint's weights become the export in OUTPUT_DIR, pushed with --push-to-hub
    if state.stopped is None:
        reason, detail = (("max_steps", f"reached --max-steps {cfg.max_steps}") if reached_max_steps(cfg, state)
                          else ("max_epochs", f"completed --epochs {cfg.epochs}"))
        state.stopped = StopRecord(reason=reason, epoch=state.epoch, step=state.global_step, detail=detail)
    result = report.final_metrics(state, job.info, accelerator, job.started, job.run_info)
    if accelerator.is_main_process:
        with background_threads_end(job):
            result = export_best(job, result)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=job.out, history=state.history, best=state.best, metrics=result,
                       accelerator=accelerator)


def begin_epoch(job: Job) -> str:
    """Start the epoch in progress, or continue it at the saved position; return the view of the feature cache it
    trains on (--cache-features; unused otherwise)."""
    state = job.state
    resumed = state.in_epoch and job.progress.loader is not None
    if resumed:
        job.train_loader.load_state_dict(job.progress.loader)
    else:
        job.train_ds.set_epoch(state.epoch)
        job.progress = EpochProgress()
    if job.unfreeze_at:
        thawed = unfreeze.apply(job.net, job.optimizer, job.accelerator, job.stepped, job.unfreeze_at, job.frozen,
                                job.thaw, state.epoch + 1)
        if thawed is not None:
            job.frozen, job.stepped = thawed.frozen, thawed.stepped
            job.scheduler = make_scheduler(job.optimizer, job.step_plan, state)  # it covers the groups it was built with
    view = features.view_for(job.cache_views, state.epoch)
    if job.cache and job.cache.begin(view, job.train_ds, job.accelerator, fresh=not resumed):
        logger.info(f"epoch {state.epoch + 1}: training the classifier on cached features ({view})")
    state.in_epoch = True
    job.net.train()
    return view


def trains_batchnorm(module: torch.nn.Module) -> bool:
    """Whether a forward pass of `module` in training updates BatchNorm statistics (which one image cannot give)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


def synced_batches(loader: Any, accelerator: Accelerator, fetched: EpochProgress,
                   smallest: int = 1) -> Iterator[tuple[Batch, bool]]:
    """Yield (batch, is_last) and stop on every process as soon as any process runs out of data.

    A batch of fewer than `smallest` images is passed over (its images are counted as fetched, not trained on): a
    BatchNorm in training cannot normalize a single image, and timm's loaders drop their last, partial batch. Such a
    batch is the last of a shard whose length leaves one image, or what is left of one whose images did not decode;
    each process passes over its own, as deterministically as it reads them (a resumed run does the same).

    Shards of a stream hold different numbers of examples, so processes agree before each step that all
    of them have a batch; otherwise DDP would wait forever for the process that has finished. Each batch
    carries the loader position and decode counters after it, so a checkpoint never includes the batch fetched
    ahead, and the seconds the loop waited for it (`waited`); `fetched` counts everything the loader produced (the
    epoch totals). When the stream stops, `fetched.rest` holds the batches this process still had.
    """

    def fetch(it: Iterator[Batch]) -> Batch | None:
        start = time.perf_counter()
        for batch in it:
            fetched.bad += batch.n_bad
            fetched.seen += batch.n_bad + len(batch.labels)
            if 0 < len(batch.labels) < smallest:
                logger.info(f"passed over a training batch of {len(batch.labels)} image(s): BatchNorm cannot train "
                            "on a single image")
            elif len(batch.labels):
                position = {"loader": loader.state_dict(), "bad": fetched.bad, "seen": fetched.seen}
                return replace(batch, position=position, waited=time.perf_counter() - start)
        return None

    def all_have(batch: Batch | None) -> bool:
        flag = torch.tensor([batch is not None], dtype=torch.int32, device=accelerator.device)
        return bool(accelerator.gather(flag).min()) if accelerator.num_processes > 1 else batch is not None

    it = iter(loader)
    current = fetch(it)
    ok = all_have(current)
    while ok and current is not None:  # (ok: every process has a batch, this one too)
        upcoming = fetch(it)
        ok_next = all_have(upcoming)
        if not ok_next:  # set before the last yield: the caller may not resume this generator after it
            fetched.rest = itertools.chain([upcoming] if upcoming is not None else [], it)
        yield current, not ok_next
        current, ok = upcoming, ok_next


def agree_on_step(accelerator: Accelerator, loss: torch.Tensor, signum: int | None,
                  state: RunState) -> tuple[float, int]:
    """(mean loss over processes, signal any process received) after one forward/backward.

    One gather serves both: a NaN on any process must stop all of them at the same step, and a signal received by
    one process must make all of them save the same checkpoint; each would otherwise wait for the others in DDP.
    """
    signals = torch.tensor([[loss.item(), float(signum or 0)]], device=accelerator.device)
    if accelerator.num_processes > 1:
        signals = accelerator.gather(signals)
    if not torch.isfinite(signals[:, 0]).all():
        raise DivergedError(f"loss became {signals[:, 0].tolist()} at step {state.global_step + 1} (epoch "
                            f"{state.epoch + 1}); try --mixed-precision bf16 or a lower --lr")
    return float(signals[:, 0].mean()), int(signals[:, 1].max())


def log_step(job: Job, bar: Any, loss: float, t0: float, waited: float) -> None:
    """The progress bar, and every --log-every optimizer steps one line and the trackers: loss, lr, images/s, the
    share of the time spent waiting for data."""
    state, elapsed = job.state, max(time.time() - t0, 1e-9)
    lr = job.optimizer.param_groups[0]["lr"]
    img_s = job.progress.n * job.accelerator.num_processes / elapsed
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
    if state.global_step % job.cfg.log_every == 0:
        logger.info(f"step {state.global_step} | loss {loss:.4f} | lr {lr:.2e} | {img_s:.0f} img/s | "
                    f"data {waited:.3f}s ({waited / elapsed:.0%})")
        job.accelerator.log({"train/loss": loss, "train/lr": lr, "train/images_per_s": img_s,
                             "train/data_wait_fraction": waited / elapsed}, step=state.global_step)


def end_epoch(job: Job, fetched: EpochProgress, seconds: float) -> None:
    """Evaluate, record the epoch, update best and early stopping, save a checkpoint, push a new best."""
    cfg, accelerator, state, progress = job.cfg, job.accelerator, job.state, job.progress
    loss_total, n_total, n_bad, n_seen = sum_over_processes(accelerator, progress.loss_sum, progress.n,
                                                            fetched.bad, fetched.seen)
    check_bad_fraction(int(n_bad), int(n_seen), cfg.max_bad_fraction, "training")
    state.examples_seen += int(n_total)
    if state.epoch == 0 and not cfg.max_steps and steps_per_epoch_hint(job.step_plan, job.info, 1) is None:
        state.steps_per_epoch = state.global_step  # learned: the schedule now spans all epochs
        job.scheduler = make_scheduler(job.optimizer, job.step_plan, state)
    if job.cache:
        job.cache.begin("val", job.val_ds, accelerator)
    job.net.eval()  # `evaluated` is unwrapped: DDP would sync buffers on every forward, and shards end unevenly
    val = metrics.evaluate(lambda b: job.logits(job.evaluated, b, "val"), job.val_loader, accelerator,
                           job.info.class_names)
    ema = None
    if job.ema is not None:
        averaged = job.ema.module
        ema = metrics.evaluate(lambda b: job.logits(averaged, b, "val"), job.val_loader, accelerator,
                               job.info.class_names)
    job.net.train()
    if job.cache:
        job.cache.end("val", accelerator, whole_pass=True)
    check_bad_fraction(val.skipped, val.skipped + val.examples, cfg.max_bad_fraction, "validation")
    row = EpochRow(epoch=state.epoch + 1, step=state.global_step, train_loss=loss_total / max(n_total, 1),
                   val=ValMetrics.of(val), train_examples=int(n_total), val_examples=val.examples,
                   skipped=Skipped(train=int(n_bad), val=val.skipped), ema=ValMetrics.of(ema) if ema else None)
    state.history.append(row)
    log_epoch(job, row)
    if accelerator.num_processes > 1:
        assert_in_sync(job)
    improved = update_best(state, row, BestPolicy.from_config(cfg), checkpoint.step_dir(job.out, state.global_step).name)
    shown = f" | ema val_acc {row.ema.accuracy:.4f} val_f1 {row.ema.f1:.4f}" if row.ema else ""
    logger.info(f"epoch {row.epoch}/{cfg.epochs} | step {row.step} | train_loss {row.train_loss:.4f} | "
                f"val_loss {row.val.loss:.4f} | val_acc {row.val.accuracy:.4f} | val_f1 {row.val.f1:.4f}{shown}"
                f" | {row.train_examples} train / {row.val_examples} val images | {seconds:.1f}s")
    if job.train_loader.decode is not None:
        logger.info(device_decode.describe_counts([job.train_loader.decode, job.val_loader.decode]))
    state.epoch += 1
    state.in_epoch = False
    if state.stopped:
        logger.info(f"early stopping: {state.stopped.detail}")
    save_checkpoint(job)
    if job.pusher is not None and improved:
        snap = hub.snapshot_dir(job.out)
        report.write_outputs(snap, job.net, cfg, job.data_cfg,
                             report.final_metrics(state, job.info, accelerator, job.started, job.run_info))
        job.pusher.submit(snap)


def log_epoch(job: Job, row: EpochRow) -> None:
    """An epoch's validation metrics (per-class F1 and skipped images too) to the trackers, at its last step."""
    values = {"train/epoch_loss": row.train_loss, "skipped_images/train": row.skipped.train,
              "skipped_images/val": row.skipped.val}
    evaluated: list[tuple[str, ValMetrics | None]] = [("val", row.val), ("ema_val", row.ema)]
    for prefix, metrics_row in evaluated:
        if metrics_row is not None:
            values.update({f"{prefix}/loss": metrics_row.loss, f"{prefix}/accuracy": metrics_row.accuracy,
                           f"{prefix}/f1": metrics_row.f1})
            values.update({f"{prefix}/f1/{name}": c.f1 for name, c in metrics_row.per_class.items()})
    job.accelerator.log(values, step=row.step)


def assert_in_sync(job: Job) -> None:
    """Every process must hold the same weights after an epoch: DDP keeps them so; if it lost a parameter (a part
    that started to train outside its gradient synchronisation), the processes would silently train apart."""
    total = torch.stack([p.detach().double().sum() for p in job.net.parameters()]).sum().reshape(1)
    sums = job.accelerator.gather(total.to(job.accelerator.device))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"the processes hold different weights after epoch {job.state.epoch + 1} ({sums.tolist()}):"
                           " gradient synchronisation was lost; this is a bug in hubtune, please report it")


def export_best(job: Job, result: RunRecord) -> RunRecord:
    """Write the best checkpoint's weights as the export in OUTPUT_DIR, then push it (main process); return the run
    record as written (with what only the export knows).

    The checkpoint is verified against its manifest first: a damaged one is never exported; the best intact
    end-of-epoch checkpoint is, and metrics.json and the card say so.
    """
    cfg, best = job.cfg, job.state.best
    assert best is not None and best.checkpoint is not None  # every run that reaches here evaluated an epoch
    path = job.out / CHECKPOINTS_DIR / best.checkpoint
    try:
        weights = checkpoint.load_weights(path, ema=best.ema)
    except CheckpointError as err:
        found = checkpoint.best_intact(job.out, job.state.history, cfg.metric, cfg.higher_is_better, {path.name})
        if found is None:
            raise CheckpointError(f"the best checkpoint cannot be exported ({err}) and no other end-of-epoch "
                                  f"checkpoint in {path.parent} is intact; nothing was exported") from err
        path, row = found
        logger.warning(f"the best checkpoint {best.checkpoint} is damaged ({err}); exporting {path.name} "
                       f"(epoch {row.epoch}), the best intact one, instead")
        # a history row: the raw weights' metrics, and no "weights" recorded (as metrics.json has always had it)
        result = replace(result, best=BestRecord(row=row, weights=None, checkpoint=path.name),
                         export_fallback=ExportFallback(wanted=best.checkpoint, wanted_epoch=best.epoch,
                                                        exported=path.name, reason=str(err)))
        weights = checkpoint.load_weights(path, ema=False)
    job.net.load_state_dict(weights)
    if cfg.calibrate:
        # only here is it known which weights are exported (the best intact checkpoint), and only on the main
        # process: it reads the whole validation split itself, while the others wait as they do for the push
        loader = calibration.validation_loader(job.source, job.reading, job.info, job.data_cfg,
                                               job.accelerator.device.type == "cuda")
        fitted = calibration.calibrate(job.net, job.normalize, loader)
        result = replace(result, calibration=fitted)
    if job.pusher is not None:  # the final push supersedes a waiting snapshot and cancels one in flight
        job.pusher.close(timeout=30)
        result = replace(result, background_pushes=job.pusher.report())
    if job.uploader is not None:  # the last checkpoint too, before the run's record is written
        job.uploader.finish(cfg.hub_checkpoints_timeout)
        result = replace(result, hub_checkpoints=job.uploader.report())
    report.write_outputs(job.out, job.net, cfg, job.data_cfg, result)
    shown = result.best
    assert shown is not None
    value = shown.metrics.score(cfg.metric)
    job.accelerator.log({f"best/{cfg.metric}": value, "best/epoch": shown.epoch}, step=job.state.global_step)
    what = "the best intact checkpoint" if result.export_fallback else "the best checkpoint"
    logger.info(f"exported {what} ({shown.checkpoint}, epoch {shown.epoch}, {cfg.metric} {value:.4f}) to {job.out}")
    if cfg.push_to_hub:
        hub.push(job.out, push_target(cfg), push_checkpoints=cfg.push_checkpoints, rerun=push_command(cfg, job.out))
    return result


def push_command(cfg: TrainConfig, out: Path) -> str:
    """The command that completes a push that failed at the end of training (rerunning training is refused)."""
    options = [("--private", cfg.private), (f"--revision {cfg.revision}", cfg.revision),
               ("--push-checkpoints", cfg.push_checkpoints), ("--overwrite-card", cfg.overwrite_card)]
    return " ".join(["hubtune push", str(out), str(cfg.push_to_hub)] + [flag for flag, on in options if on])


def finish_uploads(job: Job, path: Path) -> str | None:
    """After the checkpoint saved on SIGTERM/SIGINT: wait (--hub-checkpoints-timeout at most) for it to reach the
    Hub; say where it went, or why it did not. None without --hub-checkpoints (and on the processes that do not
    upload). The upload runs in the sync process (hubtune.hub_sync): a launcher that kills this process while it
    waits does not stop it."""
    if job.uploader is None:
        return None
    # said before waiting: `accelerate launch` SIGKILLs this process 5 s after it forwarded the signal
    logger.info(f"{path.name} saved; uploading it to {job.uploader.repo_id}@{job.uploader.branch} (at most "
                f"{job.cfg.hub_checkpoints_timeout:g}s, in a process that outlives this one; its log: "
                f"{job.uploader.log_path})")
    job.uploader.finish(job.cfg.hub_checkpoints_timeout)
    report = job.uploader.report()
    if path.name in report.uploaded:
        return f"uploaded to {report.repo}@{report.branch}"
    why = report.failure(path.name) or f"not uploaded within --hub-checkpoints-timeout {job.cfg.hub_checkpoints_timeout:g}s"
    return f"it did not reach the Hub ({why}): only this machine can resume it"


@contextlib.contextmanager
def background_threads_end(job: Job) -> Iterator[None]:
    """Whatever ends the loop, the upload threads end too (a run ending normally waits for them in export_best);
    the checkpoint sync process finishes on its own, within --hub-checkpoints-timeout."""
    try:
        yield
    except BaseException:
        if job.pusher is not None:
            job.pusher.close(timeout=5.0)
        if job.uploader is not None:
            job.uploader.abandon()
        raise


def sum_over_processes(accelerator: Accelerator, *values: float) -> list[float]:
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local).tolist()


def reached_max_steps(cfg: TrainConfig, state: RunState) -> bool:
    return bool(cfg.max_steps and state.global_step >= cfg.max_steps)


def _progress_bar(cfg: TrainConfig, accelerator: Accelerator, state: RunState) -> Any:
    if not (cfg.progress and accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
                dynamic_ncols=True)
