"""TrainConfig: the single source of truth for a run. Defaults < YAML (--config) < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hubtune.errors import MAX_BAD_FRACTION, ConfigError, did_you_mean
from hubtune.files import CHECKPOINTS_BRANCH
from hubtune.sources import repo_id_problem, revision_problem
from hubtune.tracking import default_report_to, parse_report_to

MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "lamb", "lion", "adan", "rmsprop")
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")
DECODE_DEVICES = ("auto", "cpu", "cuda")
METRICS = ("val_accuracy", "val_loss", "val_f1")
MIXUP_MODES = ("batch", "pair", "elem")  # timm Mixup's modes
ERASE_MODES = ("const", "rand", "pixel")  # timm RandomErasing's modes
# sane ranges of the integer settings: beyond them a run only exhausts the machine (a 100000 px image is 30 GB)
UPPER_BOUNDS = {"image_size": 4096, "batch_size": 65536, "epochs": 100_000, "max_steps": 10**9, "grad_accum": 4096,
                "log_every": 10**9, "shuffle_buffer": 10**7, "cache_views": 1000, "warmup_steps": 10**9,
                "num_workers": 256, "recount": 100}
AA_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")  # first part of timm's --aa strings


MUST_MATCH = "must match"


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A TrainConfig field: its default, its help, and what else it declares about itself in its metadata:
    choices, aliases (other flag and YAML names), unset_means (what the card shows as the default of an unset value),
    and its policies (see `policy_fields`)."""
    return field(default=default, metadata={"help": help, **extra})


def policy_fields(policy: str) -> dict[str, Any]:
    """{field name: what it declares} for the TrainConfig fields whose metadata names `policy`.

    The policies: "resume" (MUST_MATCH: a --resume with another value is refused), "card" (False: left out of the
    card's hyperparameter table, as it changes where and how a run writes, not what it trains), "reproduce" (the value
    `hubtune reproduce` resets it to: a rerun pushes nowhere and resumes nothing) and "cache_key" (True: part of the
    --cache-features key).
    """
    return {f.name: f.metadata[policy] for f in dataclasses.fields(TrainConfig) if policy in f.metadata}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a fine-tuning run."""

    model: str = _f("timm/resnet50.a1_in1k", "timm model: Hub id (org/name, hf-hub:org/name[@rev]), local-dir:PATH or a timm architecture name", resume=MUST_MATCH, cache_key=True)
    model_revision: str | None = _f(None, "base model revision on the Hub (resolved to a commit sha and recorded)", cache_key=True)
    pretrained: bool = _f(True, "start from the model's pretrained weights", cache_key=True)
    drop_rate: float = _f(0.0, "dropout rate before the classifier (timm create_model drop_rate)", resume=MUST_MATCH)
    drop_path_rate: float = _f(0.0, "stochastic depth rate (timm create_model drop_path_rate)", aliases=("drop_path",), resume=MUST_MATCH)
    dataset: str = _f("microsoft/cats_vs_dogs", "Hub dataset id, or a local imagefolder directory or parquet file(s)", resume=MUST_MATCH, cache_key=True)
    dataset_revision: str | None = _f(None, "dataset revision on the Hub (resolved to a commit sha and recorded)", cache_key=True)
    image_column: str | None = _f(None, "image column (default: the column with the Image feature)", cache_key=True)
    label_column: str | None = _f(None, "label column (default: the column with the ClassLabel feature)")
    val_fraction: float = _f(0.1, "fraction held out for validation when the dataset has no validation/test split", resume=MUST_MATCH)
    max_bad_fraction: float = _f(MAX_BAD_FRACTION, "stop if more than this fraction of images cannot be decoded")
    image_size: int | None = _f(None, "train/eval resolution in pixels (default: the model's pretrained_cfg)", resume=MUST_MATCH)
    shuffle_buffer: int = _f(1000, "examples held in the streaming shuffle buffer", resume=MUST_MATCH)
    epochs: int = _f(3, "passes over the training split")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides the length given by --epochs)")
    batch_size: int = _f(32, "images per process per forward pass", resume=MUST_MATCH)
    lr: float = _f(5e-4, "peak learning rate")
    weight_decay: float = _f(0.05, "weight decay")
    optimizer: str = _f("adamw", "timm optimizer name", choices=OPTIMIZERS)
    layer_decay: float | None = _f(None, "layer-wise learning-rate decay (timm), e.g. 0.75")
    warmup_steps: int = _f(0, "linear warmup steps before the cosine decay")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", resume=MUST_MATCH)
    clip_grad: float | None = _f(None, "clip the gradient norm to this value")
    mixed_precision: str | None = _f(None, "mixed precision mode; unset: what `accelerate launch --mixed_precision` or "
                                           "`accelerate config` chose, else no (the resolved mode is recorded)",
                                     choices=MIXED_PRECISION, unset_means="no", cache_key=True)
    freeze: str = _f("", "comma list of timm groups (stem, stages.0-2, blocks.1) and module globs (layer1.*) to freeze", resume=MUST_MATCH)
    freeze_bn: bool = _f(False, "also fix BatchNorm statistics in the frozen parts (held in eval mode)", resume=MUST_MATCH)
    unfreeze_at: str = _f("", "gradual unfreezing: comma list of GROUP_OR_GLOB=EPOCH (1-based, 'all' for everything) from which parts frozen by --freeze train, e.g. stages.3=2,stages.2=3,all=4", resume=MUST_MATCH)
    unfreeze_lr_scale: float = _f(1.0, "learning-rate scale of the parts --unfreeze-at adds (on top of --layer-decay)", resume=MUST_MATCH)
    augment: bool = _f(True, "random crop, flip and color jitter on training images (off: the eval transform)")
    aa: str | None = _f(None, "timm auto-augment policy applied per training image, e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original, v0 (timm create_transform auto_augment; replaces color jitter, as in timm)", resume=MUST_MATCH)
    reprob: float = _f(0.0, "random erasing probability per training image (timm RandomErasing, applied to the normalized batch on the device as timm's prefetcher does)", resume=MUST_MATCH)
    remode: str = _f("pixel", "random erasing fill", choices=ERASE_MODES, resume=MUST_MATCH)
    recount: int = _f(1, "random erasing regions per image (at most)", resume=MUST_MATCH)
    mixup: float = _f(0.0, "mixup alpha; mixup is on when > 0 (timm Mixup, with soft-target cross-entropy)", resume=MUST_MATCH)
    cutmix: float = _f(0.0, "cutmix alpha; cutmix is on when > 0 (timm Mixup)", resume=MUST_MATCH)
    mixup_prob: float = _f(1.0, "probability of mixing a batch when --mixup or --cutmix is on", resume=MUST_MATCH)
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on", resume=MUST_MATCH)
    mixup_mode: str = _f("batch", "how mixup/cutmix parameters are drawn: per batch, pair or element", choices=MIXUP_MODES, resume=MUST_MATCH)
    smoothing: float = _f(0.0, "label smoothing of the training loss (timm LabelSmoothingCrossEntropy; inside the mixed targets with --mixup/--cutmix)", resume=MUST_MATCH)
    class_weights: str = _f("none", "weights of the classes in the training loss: none, auto (inverse frequency n/(k*count) of the training split's labels, counted in a pass before training) or CLASS=W,... (unnamed classes weigh 1)", resume=MUST_MATCH)
    balanced_sampling: bool = _f(False, "draw each epoch's training examples so every class is seen about equally often: an example of a class with `count` of n examples in k classes is drawn n/(k*count) times on average (minority examples repeated with their own augmentation, majority ones thinned; deterministic per seed and epoch; validation is not resampled)", resume=MUST_MATCH)
    calibrate: bool = _f(False, "after training, fit a softmax temperature on the validation split for the exported weights; stored in config.json, applied by hubtune predict and ImageClassifier (timm and transformers ignore it)")
    cache_features: bool = _f(False, "compute backbone features once and train only the classifier on them (linear probe: needs every other parameter frozen and --freeze-bn)")
    cache_views: int = _f(1, "augmented views per training image kept by --cache-features; epoch e trains on view e mod N")
    feature_cache_dir: str | None = _f(None, "where --cache-features keeps features (default: $HF_HOME/hubtune/features)")
    jpeg_draft: bool = _f(False, "decode validation JPEGs at a reduced scale (libjpeg DCT scaling) when they are 2x+ the eval size: faster on large photos, pixels differ slightly", cache_key=True)
    decode_device: str = _f("auto", "where JPEGs are decoded and augmented: cpu (PIL in the loader workers), cuda (the workers only read bytes; decode and augment run per batch on the GPU, other images fall back to the CPU) or auto (cpu for now: cuda has not yet been measured on a GPU)", choices=DECODE_DEVICES, cache_key=True)
    channels_last: bool | None = _f(None, "run the model in channels_last memory format; unset: on when training on CUDA (faster convolutions on recent GPUs), off elsewhere; --no-channels-last turns it off", cache_key=True)
    compile: bool = _f(False, "compile the model with torch.compile (through Accelerate)")
    compile_backend: str = _f("inductor", "torch.compile backend for --compile", choices=COMPILE_BACKENDS)
    output_dir: str = _f("outputs", "where the checkpoints, metrics and Hub-ready export are written", card=False)
    overwrite_output_dir: bool = _f(False, "replace an earlier run in --output-dir (its checkpoints and export are deleted) instead of refusing to start", card=False)
    save_every: str = _f("epoch", "checkpoint every epoch, or every N optimizer steps (and at each epoch end)")
    keep_last: int = _f(2, "checkpoints kept besides the best one; older ones are deleted once a newer one is complete")
    metric: str = _f("val_accuracy", "validation metric that picks the best checkpoint (val_f1: macro F1, the unweighted mean of the per-class F1, for imbalanced classes)", choices=METRICS)
    early_stopping_patience: int | None = _f(None, "stop after this many evaluations without improvement")
    early_stopping_min_delta: float = _f(0.0, "smallest change of --metric that counts as an improvement")
    resume: str | None = _f(None, "'latest' (newest complete checkpoint in --output-dir), a checkpoint directory, 'hub' (the newest on the --hub-checkpoints branch of --push-to-hub) or hf://ORG/NAME[@BRANCH][/checkpoints/step-NNNNNN]", card=False, reproduce=None)
    push_to_hub: str | None = _f(None, "Hub repo (user/name) to push the best model, card and metrics to at the end", card=False, reproduce=None)
    private: bool = _f(False, "create the pushed repo as private", card=False)
    revision: str | None = _f(None, "branch of the pushed repo (created if missing)", card=False)
    commit_message: str | None = _f(None, "commit message of the push", card=False)
    push_checkpoints: bool = _f(False, "also push checkpoints/ (optimizer state included)", card=False, reproduce=False)
    push_every_save: bool = _f(False, "also push each new best model in the background while training", card=False, reproduce=False)
    hub_checkpoints: bool = _f(False, "upload every checkpoint in the background to a branch of --push-to-hub, so another machine can --resume hub", card=False, reproduce=False)
    hub_checkpoints_branch: str = _f(CHECKPOINTS_BRANCH, "branch of --push-to-hub that --hub-checkpoints uploads to and --resume hub reads", card=False)
    hub_checkpoints_timeout: float = _f(120.0, "seconds a run stopped by SIGTERM/Ctrl-C (or ending) waits for its last checkpoint to reach the Hub", card=False)
    overwrite_card: bool = _f(False, "replace a README.md that was edited on the Hub", card=False)
    license: str | None = _f(None, "license for the card when the base model's card declares none", card=False)
    seed: int = _f(42, "random seed", resume=MUST_MATCH)
    num_workers: int = _f(2, "data loader worker processes per training process", resume=MUST_MATCH)
    persistent_workers: bool = _f(True, "keep the data loader workers between epochs instead of starting new ones")
    model_ema: bool = _f(False, "keep an exponential moving average of the weights (timm ModelEmaV3), evaluated each epoch beside them; --metric picks the best of both", resume=MUST_MATCH)
    model_ema_decay: float = _f(0.9998, "decay of --model-ema per optimizer step", resume=MUST_MATCH)
    model_ema_warmup: bool = _f(False, "ramp the --model-ema decay up over the first steps (timm's EMA warmup)", resume=MUST_MATCH)
    log_every: int = _f(20, "optimizer steps between log lines", card=False)
    report_to: str = _f(default_report_to(), "experiment trackers through Accelerate: comma list of tensorboard, trackio, wandb, mlflow, comet_ml, aim, or all / none (the default is tensorboard when it is installed, else none)", card=False)
    progress: bool = _f(True, "show a progress bar (main process, terminals only)", card=False)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, each naming the flag, the bad value and what is accepted."""
        problems = self.problems()
        if problems:
            raise ConfigError(format_problems(problems))

    def problems(self) -> list[str]:
        """Every invalid value, one message each."""
        problems = []

        def bad(name: str, accepted: str) -> None:
            problems.append(f"--{name.replace('_', '-')}: got {getattr(self, name)!r}, expected {accepted}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in (*choices, *((None,) if f.default is None else ())):
                bad(f.name, f"one of {', '.join(choices)}{did_you_mean(getattr(self, f.name), choices)}")
        for name, most in UPPER_BOUNDS.items():
            value = getattr(self, name)
            least = 0 if name in ("warmup_steps", "num_workers") else 1
            if value is not None and value < least:
                bad(name, f"an integer >= {least}")
            elif value is not None and value > most:
                bad(name, f"an integer from {least} to {most:,} (larger values exhaust the machine)")
        if not (self.save_every == "epoch" or (self.save_every.isdigit() and int(self.save_every) > 0)):
            bad("save_every", "'epoch' or a positive number of optimizer steps")
        if self.keep_last < 1:
            bad("keep_last", "an integer >= 1")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            bad("early_stopping_patience", "an integer >= 1")
        if self.early_stopping_min_delta < 0:
            bad("early_stopping_min_delta", "a number >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            bad("val_fraction", "a number strictly between 0 and 1")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number from 0 up to (not including) 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max_bad_fraction", "a number between 0 and 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "a positive number")
        if self.weight_decay < 0:
            bad("weight_decay", "a number >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad("layer_decay", "a number in (0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            bad("clip_grad", "a positive number")
        if not 0.0 < self.model_ema_decay < 1.0:
            bad("model_ema_decay", "a number strictly between 0 and 1")
        for name, (least, most) in {"reprob": (0, 1), "mixup_prob": (0, 1), "mixup_switch_prob": (0, 1)}.items():
            if not least <= getattr(self, name) <= most:
                bad(name, f"a number from {least} to {most}")
        for name in ("mixup", "cutmix"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                bad(name, "an alpha >= 0 (0: off)")
        if not 0.0 <= self.smoothing < 1.0:
            bad("smoothing", "a number from 0 up to (not including) 1")
        if self.aa is not None and self.aa.split("-")[0] not in AA_POLICIES and not self.aa.startswith("rand"):
            bad("aa", "a timm auto-augment policy: rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original, "
                "originalr, v0, v0r or 3a")
        if self.aa is not None and not self.augment:
            bad("aa", "--augment (the auto-augment policy is part of the training augmentation; --no-augment drops it)")
        if self.mixes and self.batch_size < 2:
            bad("batch_size", "2 or more with --mixup/--cutmix (examples are mixed with others of their batch)")
        try:
            _ = self.class_weight_spec
        except ValueError as err:
            problems.append(str(err))
        if self.decode_device == "cuda" and self.aa:
            problems.append(f"--aa {self.aa!r} cannot run with --decode-device cuda: the device path replays only "
                            "timm's crop, flip and color jitter; use --decode-device cpu")
        cached_away = [flag for flag, on in (("--mixup", self.mixup), ("--cutmix", self.cutmix),
                                             ("--reprob", self.reprob), ("--balanced-sampling", self.balanced_sampling))
                       if on]
        if self.cache_features and cached_away:
            problems.append(f"--cache-features cannot be combined with {', '.join(cached_away)}: cached features are "
                            "computed from whole, unmixed and unerased images, each once per view")
        if not (self.unfreeze_lr_scale > 0 and math.isfinite(self.unfreeze_lr_scale)):
            bad("unfreeze_lr_scale", "a positive number")
        try:
            schedule = self.unfreeze_schedule
        except ValueError as err:
            problems.append(str(err))
            schedule = []
        if schedule and not self.freeze:
            bad("unfreeze_at", "parts frozen by --freeze (give --freeze too)")
        if self.cache_features and (schedule or self.model_ema):
            problems.append("--cache-features trains a fixed backbone's classifier: it cannot be combined with "
                            "--unfreeze-at or --model-ema")
        try:
            parse_report_to(self.report_to)
        except ValueError as err:
            problems.append(str(err))
        if self.hub_checkpoints and not self.push_to_hub:
            bad("hub_checkpoints", "--push-to-hub REPO too (the checkpoints go to a branch of that repo)")
        if self.push_every_save and not self.push_to_hub:
            bad("push_every_save", "--push-to-hub REPO too (the repo each new best model is pushed to)")
        if self.resume == "hub" and not self.push_to_hub:
            bad("resume", "'hub' with --push-to-hub REPO (whose checkpoint branch it reads), or hf://ORG/NAME")
        if self.hub_checkpoints_branch in ("", self.revision or "main"):
            bad("hub_checkpoints_branch", f"a branch other than the one the model is pushed to ({self.revision or 'main'})")
        for name in ("hub_checkpoints_branch", "revision"):
            if getattr(self, name) and revision_problem(getattr(self, name)):
                bad(name, "a branch name (git's rules: no '..', no part starting with '.', no spaces or ~^:?*[\\)")
        if self.push_to_hub and repo_id_problem(self.push_to_hub):
            bad("push_to_hub", f"a Hub repo id ORG/NAME ({repo_id_problem(self.push_to_hub)})")
        if not self.hub_checkpoints_timeout > 0:
            bad("hub_checkpoints_timeout", "a positive number of seconds")
        if not self.model.strip():
            bad("model", "a timm model name, Hub id or local-dir:PATH")
        if not self.dataset.strip():
            bad("dataset", "a Hub dataset id or a local path")
        return problems

    @property
    def unfreeze_schedule(self) -> list[tuple[str, int]]:
        """--unfreeze-at as [(group or glob, first epoch it trains, 1-based)], in the given order.

        Raises:
            ValueError: an item is not TOKEN=EPOCH with a positive integer epoch.
        """
        out = []
        for item in filter(None, (part.strip() for part in self.unfreeze_at.split(","))):
            token, sep, epoch = item.rpartition("=")
            if not sep or not token.strip() or not epoch.strip().isdigit() or int(epoch) < 1:
                raise ValueError(f"--unfreeze-at: got {item!r}, expected GROUP_OR_GLOB=EPOCH with an epoch >= 1, "
                                 "e.g. stages.3=2,all=4")
            out.append((token.strip(), int(epoch)))
        return out

    @property
    def class_weight_spec(self) -> str | dict[str, float]:
        """--class-weights as "none", "auto" or {class name: weight}.

        Raises:
            ValueError: not none, auto or CLASS=W,... with positive finite weights.
        """
        if self.class_weights in ("none", "auto"):
            return self.class_weights
        given: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.class_weights.split(","))):
            name, sep, weight = item.rpartition("=")
            try:
                value = float(weight)
            except ValueError:
                value = math.nan
            if not sep or not name.strip() or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--class-weights: got {item!r}, expected none, auto or CLASS=WEIGHT,... with "
                                 "positive weights, e.g. cat=1,dog=3")
            given[name.strip()] = value
        if not given:
            raise ValueError(f"--class-weights: got {self.class_weights!r}, expected none, auto or CLASS=WEIGHT,...")
        return given

    @property
    def mixes(self) -> bool:
        """Whether --mixup or --cutmix mixes training batches."""
        return bool(self.mixup or self.cutmix)

    @property
    def save_steps(self) -> int | None:
        """Optimizer steps between checkpoints inside an epoch (None: at epoch ends only)."""
        return None if self.save_every == "epoch" else int(self.save_every)

    @property
    def push_repo(self) -> str:
        """--push-to-hub, for the options that push during training (validate() refuses them without it).

        Raises:
            ConfigError: --push-to-hub is not set.
        """
        if not self.push_to_hub:
            raise ConfigError("--hub-checkpoints and --push-every-save need --push-to-hub REPO: give it")
        return self.push_to_hub

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML that `--config` reads back."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def format_problems(problems: list[str]) -> str:
    """One line for one problem; one line per problem (under a heading) for several."""
    if len(problems) == 1:
        return f"invalid configuration: {problems[0]}"
    return f"invalid configuration ({len(problems)} problems):\n  " + "\n  ".join(problems)


def _base_type(tp: Any) -> type:
    """The concrete type behind `X | None` / Literal annotations."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _optional(tp: Any) -> bool:
    return "None" in str(tp)


def _convert(name: str, raw: Any, tp: Any) -> Any:
    """Convert one YAML/flag value to the field's type or raise ConfigError naming the key."""
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and _optional(tp)):
        if _optional(tp):
            return None
        raise ConfigError(f"{name}: got None, expected a value of type {_base_type(tp).__name__}")
    base = _base_type(tp)
    if base is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"{name}: got {raw!r}, expected true or false")
    try:
        if base is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return base(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: got {raw!r}, expected a value of type {base.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field (plus --config), defaults and help taken from the dataclass."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with TrainConfig fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + name.replace("_", "-") for name in (f.name, *f.metadata.get("aliases", ()))]
        choices = f.metadata.get("choices")
        listed = " {" + ",".join(choices) + "}" if choices else ""
        help_text = f"{f.metadata['help']}{listed} (default: {f.default})"
        if _base_type(f.type) is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                *flags, dest=f.name, default=None, metavar=f.name.upper(), help=help_text,
                choices=None,  # choices are checked by validate() so every problem is reported together
            )


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Build and validate the config: defaults, then the YAML file, then explicit flags."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    aliases = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of option: value, got {type(loaded).__name__}")
        for key, raw in loaded.items():
            name = str(key).replace("-", "_")
            name = aliases.get(name, name)  # timm's names (drop_path) for the same settings
            if name not in fields:
                close = did_you_mean(name, fields).replace("; ", "", 1)
                problems.append(f"{path}: unknown key {key!r}" + (f" ({close})" if close else "")
                                + f"; accepted keys: {', '.join(fields)}")
                continue
            values[name] = raw
    for name in fields:
        raw = getattr(args, name, None)
        if raw is not None:
            values[name] = raw
    converted = {}
    for name, raw in values.items():
        try:
            converted[name] = _convert("--" + name.replace("_", "-"), raw, fields[name].type)
        except ValueError as err:
            problems.append(str(err))
    cfg = TrainConfig(**converted)
    problems += cfg.problems()
    if problems:
        raise ConfigError(format_problems(problems))
    return cfg


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, missing argument) are ConfigErrors: one `hubtune: error:` line that
    suggests the closest flag or choice and points to the help of the (sub)command that was run."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse reports them on the top parser; the subcommand that was run knows its flags
            owner = self._chosen(parsed)
            flags = [a for a in extras if a.startswith("-")]
            hint = did_you_mean(flags[0].split("=")[0], owner._option_strings()) if flags else ""
            owner.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> ArgumentParser:
        """The innermost subcommand parser that `parsed` went through (self without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(parsed, action.dest or "", None) or "")
                if isinstance(sub, ArgumentParser):
                    return sub._chosen(parsed)
        return self

    def _option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            listed = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {listed}){did_you_mean(value, action.choices)}")


def parse(argv: list[str] | None = None, prog: str = "hubtune train") -> TrainConfig:
    parser = ArgumentParser(prog=prog, description="Fine-tune a timm image classifier on a streamed dataset.")
    add_arguments(parser)
    return from_args(parser.parse_args(argv))
