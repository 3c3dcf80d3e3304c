"""A training job as its loop needs it, assembled before the first step: accelerator, data, model, loaders,
optimizer, schedule and the state a resumed run continues from.

`build_job` checks the config, the data and the model before it writes anything into the output directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.utils import disable_progress_bars
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from hubtune import (
    balance,
    checkpoint,
    data,
    device_decode,
    features,
    hub,
    hub_checkpoints,
    hub_sync,
    preflight,
    recipes,
    report,
    resume_checks,
    stream,
    tracking,
    unfreeze,
)
from hubtune import model as model_lib
from hubtune.background import BackgroundPusher
from hubtune.config import MIXED_PRECISION, TrainConfig, policy_fields
from hubtune.errors import (
    CheckpointError,
    CompileModeError,
    ConfigError,
    DataError,
    HubtuneError,
    OutputDirError,
    Problems,
    get_logger,
)
from hubtune.files import (
    CARD_FILE,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    PLOTS_DIR,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
)
from hubtune.run_state import EpochProgress, ResumeTarget, RunState, resume
from hubtune.schedule import StepPlan, make_scheduler, steps_per_epoch_hint
from hubtune.sources import parse_model_spec

logger = get_logger("hubtune")

MIN_VAL_PER_CLASS = 10  # fewer validation images than this make a class's metrics a coin toss: warn
# what a run leaves in --output-dir; an earlier run's copy is refused, or removed with --overwrite-output-dir
EARLIER_RUN = (CHECKPOINTS_DIR, TRAIN_CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, MODEL_CONFIG_FILE, CARD_FILE, PLOTS_DIR,
               tracking.RUNS_DIR)
# what a run killed before its first checkpoint leaves (checkpoints/ then holds at most unfinished temporary folders):
# `--resume` has nothing to continue, and starts afresh in its place
BEFORE_FIRST_CHECKPOINT = (CHECKPOINTS_DIR, TRAIN_CONFIG_FILE, tracking.RUNS_DIR)


@dataclass
class Job:
    """Everything the training loop works with. `net` is the bare timm module (saved, exported, evaluated);
    `stepped` is what Accelerate prepared from it for training (DDP, autocast, compile)."""

    cfg: TrainConfig  # resolved: revisions pinned to commit shas, as saved in train_config.yaml
    accelerator: Accelerator
    out: Path
    info: data.DataInfo
    net: torch.nn.Module
    evaluated: torch.nn.Module  # what validation runs: `net`, or only its classifier when features are cached
    stepped: torch.nn.Module
    optimizer: Any
    normalize: model_lib.Normalize  # uint8 loader batches to normalized floats on the device
    data_cfg: dict[str, Any]
    train_ds: stream.ExampleStream
    val_ds: stream.ExampleStream
    train_loader: Any
    val_loader: Any
    cache: features.FeatureCache | None
    run: dict[str, Any]  # what a resumed run must share with its checkpoint (see run_state.resume_differences)
    command: str  # this run's command line, for the resume hint
    frozen: list[str]  # the parameters frozen now (--freeze, less what --unfreeze-at has started to train)
    unfreeze_at: unfreeze.Schedule  # --unfreeze-at, resolved to parameter names
    ema: ModelEmaV3 | None  # --model-ema: timm's EMA of the whole model (see save_checkpoint for what is saved)
    loss: recipes.TrainingLoss  # the training loss (--smoothing, mixed targets, --class-weights); evaluation: plain CE
    mixup: Any  # --mixup/--cutmix: timm's Mixup, or None
    eraser: Any  # --reprob: timm's RandomErasing on the device, or None
    step_plan: StepPlan  # the run's length and warmup, what the learning-rate schedule is built from
    thaw: unfreeze.ThawSettings  # how parts that --unfreeze-at starts to train join the optimizer
    cache_views: int | None  # --cache-features: augmented views kept (None: the unaugmented view only)
    reading: stream.ReadSettings  # how the streams shuffle, decode and batch (--calibrate's loader reads as they do)
    source: data.DatasetSource  # the dataset as --dataset names it (--calibrate opens it again)
    scheduler: CosineLRScheduler  # positioned at the step a resumed run continues from
    run_info: dict[str, Any]  # what the card records
    state: RunState
    progress: EpochProgress  # this process's position in the epoch in progress
    pusher: BackgroundPusher | None  # --push-every-save (main process)
    uploader: hub_sync.Uploader | None  # --hub-checkpoints (main process)
    started: float  # when this process's segment of the run began

    def backbone(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of a uint8 batch, without gradients (what --cache-features stores)."""
        with torch.no_grad(), self.accelerator.autocast():
            return features.backbone_features(self.net, self.normalize(pixels))

    def train_inputs(self, batch: stream.Batch, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model inputs, targets) of a training batch: normalized, erased and mixed images (or cached features) and
        the labels, or the soft mixed targets with --mixup/--cutmix."""
        y = batch.labels.to(self.accelerator.device, non_blocking=True)
        if self.cache is not None:
            return self.cache.features(view, batch, self.backbone, self.accelerator.device), y
        x = self.normalize(batch.images())
        if self.eraser is not None:  # before mixing, as in timm (its loader erases, its loop mixes)
            x = self.eraser(x)
        if self.mixup is not None:
            x, y = recipes.mix(self.mixup, x, y)
        return x, y

    def logits(self, module: torch.nn.Module, batch: stream.Batch, view: str) -> torch.Tensor:
        """The batch's logits through `module`: `stepped` in training, the bare `evaluated` in validation."""
        if self.cache is None:
            return module(self.normalize(batch.images()))
        return module(self.cache.features(view, batch, self.backbone, self.accelerator.device))


def find_resume(cfg: TrainConfig, out: Path, accelerator: Accelerator) -> Path | None:
    """The checkpoint --resume names: local (latest, a path) or on the Hub (hub, hf://...), which the main process
    downloads into OUTPUT_DIR/checkpoints/ while the others wait; None when there is none yet (start fresh).

    A checkpoint that verifies but holds a state no run could have saved (resume_checks) is refused when named, and
    passed over for the previous one otherwise (on the Hub: downloading it), as a damaged one is.
    """
    if not cfg.resume:
        return None
    remote = hub_checkpoints.parse_resume(cfg.resume, cfg.push_to_hub, cfg.hub_checkpoints_branch)
    if remote is None:
        found = checkpoint.find_resume(out, cfg.resume, check=resume_checks.check_saved)
        if found is None:
            logger.info(f"--resume latest: no checkpoint in {out}, starting fresh")
        return found
    fetched = _fetch_remote(cfg, remote, out, accelerator)
    if fetched is None:
        return None
    older: list[str] | None = None  # the branch's checkpoints before the first one downloaded, newest first
    while fetched is not None:
        try:
            resume_checks.check_saved(fetched)
            return fetched
        except CheckpointError as err:
            if remote.name:
                raise
            logger.warning(f"--resume {cfg.resume}: skipping {fetched.name}: {err}; trying the previous one")
        if older is None:
            def names_below(below: int = checkpoint.checkpoint_step(fetched.name)) -> list[str]:
                return [n for n in hub_checkpoints.remote_names(remote) if checkpoint.checkpoint_step(n) < below]

            older = [] if is_offline_mode() else _on_main(accelerator, names_below)
        fetched = None
        while older and fetched is None:
            try:
                fetched = _fetch_remote(cfg, dataclasses.replace(remote, name=older.pop(0)), out, accelerator)
            except HubtuneError as err:
                logger.warning(f"{err}; trying the previous one")
    raise CheckpointError(f"--resume {cfg.resume}: no checkpoint on {remote} can be resumed (see the warnings)")


def named_checkpoint(cfg: TrainConfig) -> bool:
    """Whether --resume names one checkpoint (a path, hf://.../checkpoints/step-N) rather than the newest usable."""
    if cfg.resume in (None, "latest", "hub"):
        return False
    remote = hub_checkpoints.parse_resume(cfg.resume, cfg.push_to_hub, cfg.hub_checkpoints_branch)
    return remote is None or remote.name is not None


def _fetch_remote(cfg: TrainConfig, remote: hub_checkpoints.HubCheckpoints, out: Path,
                  accelerator: Accelerator) -> Path | None:
    """The checkpoint downloaded from the Hub by the main process (the others wait); None when there is none."""
    name = _on_main(accelerator, lambda: getattr(hub_checkpoints.fetch(remote, out), "name", None))
    if name is None:
        logger.info(f"--resume {cfg.resume}: no checkpoint on {remote} yet, starting fresh")
        return None
    return out / CHECKPOINTS_DIR / name


def _on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """fn() run by the main process alone (the one that talks to the Hub), its result handed to every process."""
    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            answer = [fn()]
        except HubtuneError as err:  # every process must raise it, not wait for the main one forever
            answer = [err]
    if accelerator.num_processes > 1:
        answer = broadcast_object_list(answer)
    if isinstance(answer[0], HubtuneError):
        raise answer[0]
    return answer[0]


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerate's Accelerator for the run: precision, compilation, the trackers of --report-to (logging to
    OUTPUT_DIR/runs/; they start once the output directory is checked, see tracking.start)."""
    wanted = tracking.parse_report_to(cfg.report_to)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=_cpu_only_launch(),
                              dynamo_backend=cfg.compile_backend if cfg.compile else None,
                              log_with=[n for n in wanted if tracking.installed(n)] or None,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / tracking.RUNS_DIR)))
    if accelerator.is_main_process:
        tracking.available(wanted)  # a one-line warning for each tracker that is not installed
    if cfg.compile and accelerator.state.dynamo_plugin.backend.value == "NO":
        raise CompileModeError("--compile: Accelerate was already set up in this process without torch.compile; "
                               "run training in a new process (hubtune train, accelerate launch)")
    return accelerator


def _cpu_only_launch() -> bool:
    """True when a multi-process launcher (torchrun, `accelerate launch --multi_gpu`) started us without GPUs.

    Accelerate then treats every process as a lone single-process run unless told to use the CPU, and each
    would train and write the outputs on its own; with cpu=True they form one gloo process group instead.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def dataset_source(cfg: TrainConfig) -> data.DatasetSource:
    """Where the run's examples come from (hubtune.data opens it)."""
    return data.DatasetSource(cfg.dataset, cfg.dataset_revision, cfg.image_column, cfg.label_column, cfg.val_fraction)


def read_settings(cfg: TrainConfig) -> stream.ReadSettings:
    """How the run's streams shuffle, decode and batch (hubtune.stream)."""
    return stream.ReadSettings(seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, jpeg_draft=cfg.jpeg_draft,
                               batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                               persistent_workers=cfg.persistent_workers)


def step_plan(cfg: TrainConfig) -> StepPlan:
    """The run's length and learning-rate warmup (hubtune.schedule)."""
    return StepPlan(epochs=cfg.epochs, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                    batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)


def thaw_settings(cfg: TrainConfig) -> unfreeze.ThawSettings:
    """How parts that --unfreeze-at starts to train join the optimizer (hubtune.unfreeze)."""
    return unfreeze.ThawSettings(weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                 lr_scale=cfg.unfreeze_lr_scale, freeze_bn=cfg.freeze_bn)


def mix_recipe(cfg: TrainConfig) -> recipes.MixRecipe | None:
    """--mixup/--cutmix as hubtune.recipes applies them; None when neither mixes."""
    if not cfg.mixes:
        return None
    return recipes.MixRecipe(mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mixup_prob,
                             switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, smoothing=cfg.smoothing)


def erase_recipe(cfg: TrainConfig) -> recipes.EraseRecipe:
    return recipes.EraseRecipe(prob=cfg.reprob, mode=cfg.remode, max_count=cfg.recount)


def cache_key(cfg: TrainConfig) -> features.CacheKey:
    """What --cache-features keys its tables by: the fields that declare they change features, and the seed the
    augmentation draws from (the eval transform draws nothing)."""
    return features.CacheKey(settings={name: getattr(cfg, name) for name in policy_fields("cache_key")},
                             augment_seed=cfg.seed if cfg.augment else None)


def _streams(reading: stream.ReadSettings, info: data.DataInfo, train_src: Any, val_src: Any, train_tf: Any,
             eval_tf: Any, rank: int, world_size: int) -> tuple[stream.ExampleStream, stream.ExampleStream]:
    """This process's training and validation streams (the validation split cut by content hash if needed)."""
    where = {"rank": rank, "world_size": world_size}
    split = info.val_source
    train_ds = stream.ExampleStream(data.process_source(train_src, info, shuffle_seed=reading.seed, **where),
                                    train_tf, keep_val=False if split.hashed else None,
                                    val_fraction=split.fraction or 0.0, seed=reading.seed,
                                    shuffle_buffer=reading.shuffle_buffer)
    return train_ds, val_stream(reading, info, val_src, eval_tf, rank, world_size)


def val_stream(reading: stream.ReadSettings, info: data.DataInfo, val_src: Any, eval_tf: Any, rank: int,
               world_size: int) -> stream.ExampleStream:
    """This process's validation stream, in order, with the eval transform (cut by content hash if needed)."""
    split = info.val_source
    val_ds = stream.ExampleStream(data.process_source(val_src, info, rank=rank, world_size=world_size,
                                                      shuffle_seed=None), eval_tf,
                                  keep_val=True if split.hashed else None, val_fraction=split.fraction or 0.0,
                                  seed=None, shuffle_buffer=reading.shuffle_buffer)
    if reading.jpeg_draft:
        val_ds.draft = model_lib.resize_size(eval_tf)
    return val_ds


def resolve_device_settings(cfg: TrainConfig, device: torch.device, mixed_precision: str = "no") -> TrainConfig:
    """--mixed-precision (unset: the launcher's), --channels-last and --decode-device as this run resolves them, so
    train_config.yaml and the feature cache key record what was used.

    Raises:
        ConfigError: --decode-device cuda without a CUDA device.
    """
    if mixed_precision not in MIXED_PRECISION:  # accelerate also knows fp8, which hubtune neither tests nor records
        raise ConfigError(f"mixed precision {mixed_precision!r} (from accelerate launch --mixed_precision or "
                          f"`accelerate config`) is not supported; use one of {', '.join(MIXED_PRECISION)}")
    if cfg.decode_device == "cuda" and device.type != "cuda":
        raise ConfigError(f"--decode-device cuda: this run trains on {device.type}, not CUDA; use --decode-device cpu "
                          "(or auto)")
    return dataclasses.replace(
        cfg, mixed_precision=mixed_precision,
        channels_last=model_lib.default_channels_last(device) if cfg.channels_last is None else cfg.channels_last,
        # auto stays on the CPU decoder until the cuda path has been run and measured on a GPU (bench/gpu_check.py)
        decode_device="cpu" if cfg.decode_device == "auto" else cfg.decode_device)


def build_job(cfg: TrainConfig) -> Job:
    """Check and assemble the run described by `cfg`; resume it when --resume finds a checkpoint."""
    cfg.validate()
    if not (cfg.progress and sys.stderr.isatty()):  # the Hub client's bars too: no cursor codes in a log file
        disable_progress_bars()
    accelerator = make_accelerator(cfg)
    cfg = resolve_device_settings(cfg, accelerator.device, accelerator.mixed_precision)
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    # everything that can be checked before the first step is, and every problem found is reported at once
    found = Problems()
    found.errors += _on_main(accelerator, lambda: preflight.write_access(
        push_target(cfg) if cfg.push_to_hub else None, cfg.hub_checkpoints))
    resume_from, before = None, len(found.errors)
    with found.check():
        resume_from = find_resume(cfg, out, accelerator)
    resume_refused = len(found.errors) > before
    if resume_from is not None:  # the same run: the base model and dataset commits it pinned, unless given here
        pinned = checkpoint.saved_config(resume_from)
        cfg = dataclasses.replace(cfg, model_revision=cfg.model_revision or pinned.get("model_revision"),
                                  dataset_revision=cfg.dataset_revision or pinned.get("dataset_revision"))
    earlier: list[str] = []
    if not resume_refused:  # the output dir is judged by whether a checkpoint continues it: say only why not
        with found.check():
            earlier = check_output_dir(cfg, out, resuming=resume_from is not None)

    # data, and the base model pinned to a commit sha: the resolved config is built once, then saved
    info: data.DataInfo | None = None
    with found.check():
        train_src, val_src, info = data.open_splits(dataset_source(cfg))
        logger.info(f"dataset {cfg.dataset}: classes {info.class_names}, validation from {info.val_source}")
        balance.check_class_names(cfg.class_weight_spec, info.class_names)
    net: torch.nn.Module | None = None
    with found.check():
        spec = parse_model_spec(cfg.model)
        spec = dataclasses.replace(spec, revision=cfg.model_revision or spec.revision)  # a pinned sha wins over @rev
        timm_name, base_model = hub.resolve_model(spec) if cfg.pretrained else (cfg.model, {"id": None})
        regularization = {k: getattr(cfg, k) for k in ("drop_rate", "drop_path_rate") if getattr(cfg, k)}
        classes = len(info.class_names) if info is not None else 2  # the model is checked even when the data is not
        # weights are downloaded only for a run that can start (the weight files' existence is checked either way)
        net = model_lib.create(timm_name, num_classes=classes, pretrained=cfg.pretrained and not found.errors,
                               **regularization)
        frozen = model_lib.resolve_freeze(net, cfg.freeze) if cfg.freeze else []
        model_lib.freeze(net, frozen, cfg.freeze_bn)  # before DDP wraps it: no find_unused_parameters needed
        if not any(p.requires_grad for p in net.parameters()):
            raise ConfigError(f"--freeze {cfg.freeze!r} leaves no trainable parameters; leave at least the head "
                              "trainable")
        if cfg.cache_features:
            features.check_cacheable(net)
    # only the main process writes checkpoints: its disk is the one that must hold them
    need = preflight.checkpoint_bytes(net, cfg.optimizer, cfg.model_ema) if net is not None else 0
    found.errors += _on_main(accelerator, lambda: preflight.disk_room(out, need))
    found.raise_all("before training")
    assert info is not None and net is not None
    cfg = dataclasses.replace(cfg, model_revision=base_model.get("revision") or cfg.model_revision,
                              dataset_revision=info.revision or cfg.dataset_revision)
    if cfg.model_ema and resume_from is None:  # a resumed run cannot change its EMA settings
        check_ema_horizon(cfg, info, accelerator.num_processes)
    logger.info("parameters:\n" + model_lib.format_table(model_lib.parameter_table(net)))

    data_cfg = model_lib.data_config(net, cfg.image_size)
    check_input_size(cfg, net, data_cfg, accelerator.device)
    train_tf, eval_tf = model_lib.transforms(data_cfg, cfg.aa)  # uint8 tensors; `prepare` normalizes whole batches
    train_tf = train_tf if cfg.augment else eval_tf
    # (resolve_device_settings has replaced an unset --channels-last by the device's default)
    prepare = model_lib.Normalize(data_cfg, accelerator.device, channels_last=bool(cfg.channels_last))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    rank, world = accelerator.process_index, accelerator.num_processes
    reading = read_settings(cfg)
    train_ds, val_ds = _streams(reading, info, train_src, val_src, train_tf, eval_tf, rank, world)
    # counted at every start (a resumed run included): the draw rates must be known before the first epoch's pass
    imbalance = balance.resolve(train_ds, info.class_names, cfg.class_weight_spec, cfg.balanced_sampling, accelerator)
    train_ds.draw_rates = imbalance.draw_rates
    cache = None
    if cfg.cache_features:
        cache = features.FeatureCache(Path(cfg.feature_cache_dir or features.default_dir()),
                                      features.fingerprint(cache_key(cfg), net, data_cfg, train_tf, eval_tf), rank,
                                      world)
        train_ds.views = cfg.cache_views
    pin = accelerator.device.type == "cuda"
    train_loader = stream.make_loader(train_ds, reading.batch_size, reading.num_workers, pin,
                                      reading.persistent_workers)
    val_loader = stream.make_loader(val_ds, reading.batch_size, reading.num_workers, pin, reading.persistent_workers)
    if cfg.decode_device == "cuda":
        for ds, loader, tf in ((train_ds, train_loader, train_tf), (val_ds, val_loader, eval_tf)):
            device_decode.check(tf)
            ds.planned, loader.decode = True, device_decode.BatchDecoder(accelerator.device)

    optimizer = create_optimizer_v2(net, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)  # timm skips frozen parameters
    # The loaders are not prepared: each process already reads its own shard (see data.process_source). With cached
    # features each step runs only the classifier, so only the classifier is prepared (DDP, autocast).
    head = net if cache is None else model_lib.as_timm(net).get_classifier()
    net.to(accelerator.device)
    stepped, optimizer = accelerator.prepare(head, optimizer)

    schedule = unfreeze.resolve_schedule(net, cfg.unfreeze_schedule, cfg.freeze, frozen) if cfg.unfreeze_at else []
    # after prepare: the EMA copy evaluates with the same (autocast) forward as the model
    ema = ModelEmaV3(net, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    run = {"dataset_revision": info.revision, "class_names": info.class_names,
           "val_source": info.val_source.to_json(), "num_processes": world, "frozen_parameters": frozen,
           "model_revision": cfg.model_revision}
    plan, thaw, started = step_plan(cfg), thaw_settings(cfg), time.time()
    state, progress = RunState(steps_per_epoch=steps_per_epoch_hint(plan, info, world)), EpochProgress()
    frozen_now = frozen  # less what --unfreeze-at has started to train, once a resumed run has replayed it
    if resume_from is not None:  # one that does not fit this model falls back to an older one, unless named
        target = ResumeTarget(cfg=cfg, run=run, out=out, accelerator=accelerator, net=net, ema=ema,
                              optimizer=optimizer, stepped=stepped, unfreeze_at=schedule, frozen=frozen, thaw=thaw,
                              steps_per_epoch=state.steps_per_epoch)
        resume_from, restored = resume(target, resume_from, named=named_checkpoint(cfg))
        state, progress, frozen_now, stepped = restored.state, restored.progress, restored.frozen, restored.stepped
    validation = count_validation(cfg, info, val_ds, accelerator)
    # everything is checked: from here on the output directory is written (after every process looked at it)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_output_dir(cfg, out, earlier)
    accelerator.wait_for_everyone()
    command = report.resume_command(cfg.mixed_precision)
    settings = report.RunSettings(cfg.model, cfg.dataset, cfg.freeze, cfg.freeze_bn, cfg.mixed_precision,
                                  cfg.batch_size, cfg.grad_accum)
    run_info = {**report.run_info(settings, accelerator, net, frozen, base_model, info, command),
                "validation": validation, "class_balance": imbalance.record()}
    main = accelerator.is_main_process
    pusher = _background_pusher(cfg) if cfg.push_every_save and main else None
    uploader = hub_sync.Uploader(cfg.push_repo, cfg.hub_checkpoints_branch, out, cfg.private,
                                 cfg.hub_checkpoints_timeout) if cfg.hub_checkpoints and main else None
    job = Job(cfg=cfg, accelerator=accelerator, out=out, info=info, net=net, evaluated=head, stepped=stepped,
              optimizer=optimizer, normalize=prepare, data_cfg=data_cfg, train_ds=train_ds, val_ds=val_ds,
              train_loader=train_loader, val_loader=val_loader, cache=cache, run=run, command=command,
              frozen=frozen_now, unfreeze_at=schedule, ema=ema,
              loss=recipes.TrainingLoss(cfg.smoothing, imbalance.loss_weights),
              mixup=recipes.make_mixup(mix_recipe(cfg), len(info.class_names)),
              eraser=recipes.make_eraser(erase_recipe(cfg), accelerator.device), step_plan=plan, thaw=thaw,
              cache_views=cfg.cache_views if cfg.augment else None, reading=reading, source=dataset_source(cfg),
              scheduler=make_scheduler(optimizer, plan, state), run_info=run_info, state=state, progress=progress,
              pusher=pusher, uploader=uploader, started=started)
    tracking.start(accelerator, cfg.to_dict(), resume_step=state.global_step if resume_from else 0)
    return job


def check_ema_horizon(cfg: TrainConfig, info: data.DataInfo, world_size: int) -> None:
    """Warn when --model-ema-decay averages over more steps than the run has: its weights would stay near the start."""
    per_epoch = steps_per_epoch_hint(step_plan(cfg), info, world_size)
    steps = cfg.max_steps or (per_epoch * cfg.epochs if per_epoch else None)
    horizon = 1 / (1 - cfg.model_ema_decay)
    if steps is None or cfg.model_ema_warmup or horizon <= steps:
        return
    suggested = max(0.5, 1 - 10 / steps)
    logger.warning(f"--model-ema-decay {cfg.model_ema_decay:g} averages over about {horizon:,.0f} optimizer steps, but "
                   f"this run has about {steps:,}: the EMA weights would stay close to the starting ones. Add "
                   f"--model-ema-warmup (timm's EMA warmup: the decay ramps up with the step) or use a decay of about "
                   f"{suggested:.3g} (a horizon of a tenth of the run)")


def count_validation(cfg: TrainConfig, info: data.DataInfo, val_ds: stream.ExampleStream,
                     accelerator: Accelerator) -> dict[str, Any]:
    """Validation images per class, from a pass over the keys (nothing is decoded), stopped early once every class
    has MIN_VAL_PER_CLASS of them. Refuses an empty validation split; warns about classes with few images.

    Raises:
        DataError: no image of the dataset falls into the validation split.
    """
    n = len(info.class_names)
    counts = torch.zeros(n, dtype=torch.int64)
    labels = val_ds.labels()
    for label in labels:
        counts[label] += 1
        if counts.min() >= MIN_VAL_PER_CLASS:
            break
    labels.close()
    complete = bool(counts.min() < MIN_VAL_PER_CLASS)  # the pass saw every example of this process's shard
    both = torch.cat([counts, torch.tensor([int(complete)])]).to(accelerator.device)
    if accelerator.num_processes > 1:
        both = torch.cat([accelerator.reduce(both[:n], "sum"), accelerator.reduce(both[n:], "min")])
    per_class: list[int] = both[:n].tolist()
    complete = bool(both[n])
    if sum(per_class) == 0:
        where = (f"--val-fraction {cfg.val_fraction} held out none of its images (each image goes to validation "
                 f"with that probability, by a hash of its bytes)" if info.val_source.hashed
                 else f"its {info.val_source.name!r} split is empty")
        raise DataError(f"--dataset {cfg.dataset!r} has no validation images: {where}; raise --val-fraction or "
                        "give a dataset with a validation split")
    small = [name for name, c in zip(info.class_names, per_class) if c < MIN_VAL_PER_CLASS]
    if small:
        shown = ", ".join(f"{name!r}: {c}" for name, c in zip(info.class_names, per_class) if name in small)
        logger.warning(f"few validation images for {len(small)} class(es) ({shown}; fewer than {MIN_VAL_PER_CLASS}): "
                       "their per-class metrics are unreliable; raise --val-fraction or add images")
    return {"per_class": dict(zip(info.class_names, per_class)), "complete": complete,
            "min_per_class": MIN_VAL_PER_CLASS, "small_classes": small}


def check_input_size(cfg: TrainConfig, net: torch.nn.Module, data_cfg: dict[str, Any], device: torch.device) -> None:
    """Refuse an input size the model cannot take, or whose batches alone would not fit in memory.

    Raises:
        ConfigError: naming the size, what the model or the machine allows, and what to lower.
    """
    size = data_cfg["input_size"][-1]
    pretrained_cfg = model_lib.as_timm(net).pretrained_cfg
    fixed = pretrained_cfg.get("fixed_input_size")
    native = pretrained_cfg.get("input_size", (3, size, size))[-1]
    if cfg.image_size and fixed and cfg.image_size != native:
        raise ConfigError(f"--image-size {cfg.image_size}: {cfg.model} takes only {native} px inputs "
                          f"(fixed_input_size in its pretrained_cfg); leave --image-size unset or set it to {native}")
    # the cheap part of the memory: uint8 batches queued by the loader workers (prefetch 4 each, pinned copies on
    # CUDA), the float batch on the device and its normalized copy; activations come on top
    resize = size / float(data_cfg.get("crop_pct") or 1.0)
    image = 3 * resize * resize
    queued = image * cfg.batch_size * (4 * max(cfg.num_workers, 1) + 2)
    on_device = image * cfg.batch_size * 4 * 2
    available = _available_memory(device)
    needed = queued + on_device if device.type == "cpu" else on_device
    if available is not None and needed > available:
        raise ConfigError(f"--image-size {size} with --batch-size {cfg.batch_size} and --num-workers {cfg.num_workers}"
                          f" needs about {needed / 2**30:.1f} GiB for the input batches alone; {device.type} has "
                          f"{available / 2**30:.1f} GiB free; lower --image-size, --batch-size or --num-workers")


def _available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (system RAM for the CPU), when the platform says."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_output_dir(cfg: TrainConfig, out: Path, resuming: bool) -> list[str]:
    """What an earlier run left in --output-dir that this one replaces (--overwrite-output-dir, or --resume of a run
    killed before its first checkpoint).

    Raises:
        OutputDirError: it is a file, or it holds an earlier run (without --resume or --overwrite-output-dir).
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output-dir {str(out)!r} is a file; give a directory (created if missing)")
    earlier = [] if resuming else [name for name in EARLIER_RUN if (out / name).exists()]
    if earlier and cfg.resume and set(earlier) <= set(BEFORE_FIRST_CHECKPOINT) and not checkpoint.listing(out):
        logger.info(f"--resume {cfg.resume}: {out} holds only what a run writes before its first checkpoint "
                    f"({', '.join(earlier)}); replacing it and starting fresh")
        return earlier
    if earlier and not cfg.overwrite_output_dir:
        held = f"--output-dir {str(out)!r} holds an earlier run ({', '.join(earlier)})"
        fix = "pass --overwrite-output-dir to replace it, or give another --output-dir"
        raise OutputDirError(f"{held} and no checkpoint to continue it from; {fix}" if cfg.resume else
                             f"{held}; pass --resume latest to continue it, {fix.removeprefix('pass ')}")
    return earlier


def write_output_dir(cfg: TrainConfig, out: Path, earlier: list[str]) -> None:
    """Remove the earlier run's files (`check_output_dir`), then write train_config.yaml (main process).

    Raises:
        OutputDirError: the directory cannot be created or written.
    """
    for name in earlier:  # only the files hubtune writes; anything else in the folder stays
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / TRAIN_CONFIG_FILE)
    except OSError as err:
        raise OutputDirError(f"--output-dir {str(out)!r} cannot be written ({err.strerror or err}); give a "
                             "writable directory") from err


def push_target(cfg: TrainConfig) -> hub.PushTarget:
    """Where the run pushes its model (--push-to-hub, or the repo --push-every-save needs), and how."""
    return hub.PushTarget(cfg.push_repo, revision=cfg.revision, private=cfg.private,
                          commit_message=cfg.commit_message, overwrite_card=cfg.overwrite_card)


def _background_pusher(cfg: TrainConfig) -> BackgroundPusher:
    return hub.export_pusher(dataclasses.replace(push_target(cfg), commit_message="hubtune: new best checkpoint"))
