"""The model card: Hub metadata and template variables from a run's outputs, rendered from cards/model_card.md.j2.

Everything comes from the files `hubtune train` leaves in its output directory, so a card can be re-rendered
offline at any time (`hubtune card OUTPUT_DIR`). Older outputs without `run_info` in metrics.json render
"unknown" for what only run_info records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hubtune import plots
from hubtune.config import TrainConfig, policy_fields
from hubtune.data import ValSplit
from hubtune.errors import ConfigError
from hubtune.files import CARD_FILE, CHECKPOINTS_DIR, METRICS_FILE, MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE
from hubtune.records import BestRecord, CheckpointUploads, RunInfo, RunRecord
from hubtune.sources import parse_model_spec
from hubtune.tracking import RUNS_DIR

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# stdlib logger: accelerate's get_logger refuses to log before an Accelerator exists, and rendering needs none
logger = logging.getLogger(__name__)

TEMPLATE = "model_card.md.j2"
HUB_URL = "https://huggingface.co"
TAGS = ["timm", "image-classification", "hubtune", "transfer-learning"]
TASK = ("image-classification", "Image Classification")
EVAL_METRICS = (("accuracy", "Accuracy", "val_accuracy"), ("f1", "F1 (macro)", "val_f1"), ("loss", "Loss", "val_loss"))
VERSION_KEYS = ("torch", "timm", "accelerate", "datasets", "huggingface_hub", "hubtune")
# where the run wrote to, how it reported and where it was shared: not what was trained
# absent when unknown (license comes from the metadata, which drops empty fields), or only given by `hubtune export`
# (onnx); defaulted in the template
OPTIONAL_VARIABLES = frozenset({"repo_id", "license", "onnx"})
ONNX_BLOCK = "onnx_usage"  # the ONNX section, also rendered alone for `hubtune export --push`
SMALL_VAL_THRESHOLD = 100
MAX_LISTED_LABELS = 30
TOP_K = 2


def template_dir() -> Traversable:
    """The folder holding the card templates: `hubtune.cards` when installed, else the checkout's cards/."""
    try:
        return resources.files("hubtune.cards")
    except ModuleNotFoundError:  # a source checkout, or an editable install made before cards/ was mapped in
        return Path(__file__).resolve().parent.parent / "cards"


def _filter(fmt: str) -> Any:
    return lambda value: "unknown" if value is None else fmt.format(value)


def environment() -> jinja2.Environment:
    """The strict Jinja environment the card templates are rendered with: undefined variables raise."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: template_dir().joinpath(name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(num=_filter("{:,}"), f4=_filter("{:.4f}"), pct=_filter("{:.2%}"), code=_filter("`{}`"),
                       cell=lambda value: str(value).replace("|", "\\|"))
    return env


def load_outputs(output_dir: str | Path) -> dict[str, Any]:
    """Read config.json, metrics.json and train_config.yaml of a finished run.

    Raises:
        ConfigError: the directory lacks metrics.json or config.json.
    """
    out = Path(output_dir)
    missing = [name for name in (METRICS_FILE, MODEL_CONFIG_FILE) if not (out / name).is_file()]
    if missing:
        raise ConfigError(f"{out} is not the output directory of a finished `hubtune train` run: missing "
                         f"{' and '.join(missing)}; pass the run's --output-dir after training completed")
    config_path = out / TRAIN_CONFIG_FILE
    return {
        "runs": sorted(p.relative_to(out).as_posix() for p in (out / RUNS_DIR).rglob("*tfevents*")),
        "model_config": json.loads((out / MODEL_CONFIG_FILE).read_text()),
        "metrics": RunRecord.from_json(json.loads((out / METRICS_FILE).read_text())),
        "train_config": (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {},
    }


def _hub_model(spec: str) -> tuple[str | None, str | None]:
    """(Hub id, revision) read off a --model value, for outputs that predate run_info; (None, None) if not a Hub id."""
    try:
        parsed = parse_model_spec(spec)
    except ValueError:
        return None, None
    return (parsed.repo_id, parsed.revision) if parsed.kind == "hub" else (None, None)


def resolve_license(base_license: str | None, flag: str | None) -> tuple[str | None, str | None]:
    """(license, where it came from): the base model's card wins, then --license; never a guess."""
    if base_license:
        if flag and flag != base_license:
            logger.warning(f"--license {flag!r} ignored: the base model's card says {base_license!r}, which a "
                           "fine-tune inherits")
        return base_license, "base_model"
    return (flag, "flag") if flag else (None, None)


def _hyperparameters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    def show(value: Any) -> str:
        if value is None or isinstance(value, bool):
            return {None: "none", True: "true", False: "false"}[value]
        return str(value) if value != "" else '""'

    # a field whose unset value is resolved at run time (the launcher's precision) shows what it means without one
    defaults = {f.name: f.metadata.get("unset_means", f.default) for f in dataclasses.fields(TrainConfig)}
    hidden = policy_fields("card")  # where and how a run writes, not what it trains
    return [
        {"flag": name.replace("_", "-"), "value": show(value),
         "default": show(defaults[name]) if name in defaults else "unknown",
         "changed": name in defaults and value != defaults[name]}
        for name, value in cfg.items() if name not in hidden  # in the saved file's order
    ]


def _wall_time(seconds: float | None, segments: int = 1) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 60:
        shown = f"{seconds:.1f} s"
    else:
        minutes, secs = divmod(round(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        shown = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
    if segments > 1:  # a resumed run: every process that trained it, each up to its last checkpoint
        shown += f" over {segments} segments (interrupted and resumed {segments - 1} time{'s' if segments > 2 else ''})"
    return shown


def _val_split(source: str | None) -> dict[str, Any]:
    try:
        split = ValSplit.from_json(source or "")
    except ValueError:  # a record from before the split was recorded
        return {"kind": None, "fraction": None, "name": None}
    return {"kind": "hash" if split.hashed else "split", "fraction": split.fraction, "name": split.name}


def _base_model(run: RunInfo, cfg: dict[str, Any]) -> dict[str, Any]:
    base = dict(run.base_model or {})
    base.setdefault("spec", cfg.get("model"))
    spec_id, spec_revision = _hub_model(base["spec"] or "")
    base.setdefault("id", spec_id)
    base.setdefault("revision", spec_revision)
    base.setdefault("license", None)
    base["pretrained"] = cfg.get("pretrained", True)
    if not base["pretrained"]:  # random weights: the architecture may come from a repo, the weights did not
        base["id"] = base["revision"] = base["license"] = None
    base.update(link=f"{HUB_URL}/{base['id']}", revision_link=f"{HUB_URL}/{base['id']}/tree/{base['revision']}")
    return base


def _dataset(run: RunInfo, cfg: dict[str, Any], metrics: RunRecord) -> dict[str, Any]:
    dataset = dict(run.dataset or {})
    dataset.setdefault("id", cfg.get("dataset"))
    dataset.setdefault("revision", metrics.dataset_revision)
    dataset.setdefault("is_hub", dataset["revision"] is not None)  # only Hub datasets get a revision
    dataset["name"] = dataset["id"] if dataset["is_hub"] else Path(dataset["id"] or "unknown").name
    dataset.update(link=f"{HUB_URL}/datasets/{dataset['id']}",
                   revision_link=f"{HUB_URL}/datasets/{dataset['id']}/tree/{dataset['revision']}")
    return dataset


def _eval_results(best: BestRecord, dataset: dict[str, Any], val_split: dict[str, Any]) -> list[EvalResult]:
    """The best epoch's validation metrics as model-index entries, so the Hub shows them."""
    if val_split["kind"] == "hash":
        split = f"train ({val_split['fraction'] * 100:g}% held out)"
    else:
        split = val_split["name"] or "validation"
    return [
        EvalResult(task_type=TASK[0], task_name=TASK[1], dataset_type=dataset["name"], dataset_name=dataset["name"],
                   dataset_split=split, dataset_revision=dataset["revision"], metric_type=metric, metric_name=name,
                   metric_value=round(best.metrics.score(key), 4))
        for metric, name, key in EVAL_METRICS
    ]


def build(outputs: dict[str, Any], repo_id: str | None = None, license: str | None = None,
          plot_files: list[str] | None = None) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and the template variables (besides those from the metadata) for loaded outputs."""
    metrics: RunRecord = outputs["metrics"]
    cfg, model_config = outputs["train_config"], outputs["model_config"]
    run = metrics.run_info
    repo_id = repo_id or cfg.get("push_to_hub")  # the repo the run was pushed to, if any
    best, class_names = metrics.best, list(metrics.class_names)
    if best is None:
        raise ConfigError("metrics.json records no evaluation (its best is empty): the run did not finish an epoch")
    base, dataset = _base_model(run, cfg), _dataset(run, cfg, metrics)
    val_split = _val_split(run.val_source)
    license_id, license_source = resolve_license(base["license"], license or cfg.get("license"))
    architecture = model_config.get("architecture", "unknown")
    title = repo_id.split("/")[-1] if repo_id else f"{architecture} on {dataset['name']}"
    relation: dict[str, Any] = {"base_model_relation": "finetune"} if base["id"] else {}  # ModelCardData **kwargs
    card_data = ModelCardData(
        library_name="timm", pipeline_tag=TASK[0], tags=list(TAGS) + (["tensorboard"] if outputs.get("runs") else []), license=license_id, base_model=base["id"],
        datasets=[dataset["id"]] if dataset["is_hub"] else None, metrics=[m for m, _, _ in EVAL_METRICS[:2]],
        model_name=title, eval_results=_eval_results(best, dataset, val_split), **relation,
    )

    pcfg = model_config.get("pretrained_cfg", {})
    size = pcfg.get("input_size")
    stopped = metrics.stopped.to_json() if metrics.stopped else {"reason": None, "epoch": None, "detail": None}
    skipped = metrics.skipped.to_json() if metrics.skipped else {"train": None, "val": None}
    plot_files = plot_files or []
    context = {
        "title": title, "architecture": architecture, "label_names": class_names, "num_classes": len(class_names),
        "max_listed_labels": MAX_LISTED_LABELS, "input_size": f"{size[-1]}x{size[-2]}" if size else "unknown",
        **{key: pcfg.get(key, "unknown") for key in ("interpolation", "crop_pct", "mean", "std")},
        "base": base, "dataset": dataset, "val_split": val_split, "license_source": license_source,
        "train_examples": metrics.train_examples, "val_examples": metrics.val_examples, "skipped": skipped,
        "parameters": run.parameters or {"total": None, "trainable": None, "frozen": None},
        "frozen_groups": run.frozen_groups,
        "freeze": run.freeze if run.freeze is not None else cfg.get("freeze", ""),
        "freeze_bn": run.freeze_bn if run.freeze_bn is not None else cfg.get("freeze_bn"),
        "hyperparameters": _hyperparameters(cfg),
        "effective_batch_size": run.effective_batch_size or (
            cfg["batch_size"] * cfg.get("grad_accum", 1) * (metrics.num_processes or 1)
            if "batch_size" in cfg else None),
        "mixed_precision": run.mixed_precision or cfg.get("mixed_precision"),
        "devices": run.devices or {"type": None, "count": metrics.num_processes, "name": None},
        "wall_time": _wall_time(metrics.wall_time_s, metrics.segments), "stopped": stopped,
        "epochs_run": stopped.get("epoch") or len(metrics.history), "epochs_max": cfg.get("epochs"),
        "global_step": metrics.global_step, "metric": cfg.get("metric", "val_accuracy"), "best": best.to_json(),
        "per_class": [{"label": name, **best.metrics.per_class[name].to_json()} for name in class_names
                      if name in best.metrics.per_class],
        "history": [row.to_json() for row in metrics.history],
        "plots": {"confusion_matrix": plots.CONFUSION_MATRIX if plots.CONFUSION_MATRIX in plot_files else None,
                  "training_curves": plots.TRAINING_CURVES if plots.TRAINING_CURVES in plot_files else None,
                  "reliability": plots.RELIABILITY if plots.RELIABILITY in plot_files else None},
        # --calibrate: the temperature and ECE/NLL before and after
        "calibration": metrics.calibration.to_json() if metrics.calibration else None,
        "top_k": min(TOP_K, len(class_names)), "command": run.command, "seed": cfg.get("seed", "unknown"),
        "versions": [(name, (run.versions or {}).get(name)) for name in VERSION_KEYS],
        "small_val_threshold": SMALL_VAL_THRESHOLD,
        "validation": run.validation or {"small_classes": [], "min_per_class": None},
        "class_balance": _class_balance(run.class_balance, cfg.get("class_weights")),
        "export_fallback": metrics.export_fallback.to_json() if metrics.export_fallback else None,
        "tensorboard": bool(outputs.get("runs")), "weights": best.weights or "model",
        "ema_decay": cfg.get("model_ema_decay"), "model_ema": bool(cfg.get("model_ema")), "unfreeze_at": cfg.get("unfreeze_at", ""),
        "pushed": bool(cfg.get("push_to_hub")),  # reproducing must not push to this repo again
        "hub_checkpoints": _hub_checkpoints(metrics.hub_checkpoints),
    }
    if repo_id:
        context["repo_id"] = repo_id
    return card_data, context


def _class_balance(record: dict[str, Any] | None, flag: str | None) -> dict[str, Any] | None:
    """The training counts, loss weights and draw rates as the card lists them (None for outputs that predate them)."""
    if not record:
        return None

    def listed(values: dict[str, float]) -> str:
        shown = ", ".join(f"`{name}` {value:,}" if isinstance(value, int) else f"`{name}` {value:.4g}"
                          for name, value in list(values.items())[:MAX_LISTED_LABELS])
        return shown + (f", ... ({len(values):,} classes)" if len(values) > MAX_LISTED_LABELS else "")

    return {"counts": listed(record["train_counts"]), "complete": record["complete"],
            "sample_limit": record.get("sample_limit"), "auto": flag == "auto",
            "weights": listed(record["class_weights"]) if record.get("class_weights") else None,
            "rates": listed(record["draw_rates"]) if record.get("draw_rates") else None}


def _hub_checkpoints(record: CheckpointUploads | None) -> dict[str, Any] | None:
    """Where --hub-checkpoints put the run's checkpoints, for the card (None without it)."""
    if record is None:
        return None
    return {**record.to_json(), "url": f"{HUB_URL}/{record.repo}/tree/{quote(record.branch, safe='')}/{CHECKPOINTS_DIR}"}


def render(card_data: ModelCardData, context: dict[str, Any], template: str = TEMPLATE) -> str:
    """Render the template like `ModelCard.from_template` does (metadata fields are variables too), but strictly.

    Raises:
        jinja2.UndefinedError: the template uses a variable that neither the metadata nor `context` provides.
    """
    variables = {**card_data.to_dict(), **context}
    return environment().get_template(template).render(card_data=card_data.to_yaml(), **variables)


def render_onnx_usage(repo_id: str, onnx: dict[str, Any], top_k: int) -> str:
    """The card's ONNX section alone, for a card already on the Hub (`hubtune export --push` puts it in).

    Args:
        repo_id: the model repo the snippet downloads from.
        onnx: what was exported: file, preprocessing and int8 paths in the repo, opset, parity, source revision.
        top_k: predictions the snippet prints.
    """
    template = environment().get_template(TEMPLATE)
    context = template.new_context({"repo_id": repo_id, "onnx": onnx, "top_k": top_k})
    return "".join(template.blocks[ONNX_BLOCK](context))


def render_card(output_dir: str | Path, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """Render the model card for a run's outputs, writing its plots into output_dir/plots/ first.

    Args:
        output_dir: the run's --output-dir.
        repo_id: the Hub repo the model goes to (snippets use a placeholder when None).
        license: license id to use when the base model's card gives none.

    Raises:
        ConfigError: output_dir is not a finished run, or repo_id is not a valid Hub repo id.
    """
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ConfigError(f"--repo-id {repo_id!r} is not a valid Hub repo id (expected org/name): {err}") from None
    outputs = load_outputs(output_dir)
    written = plots.write_plots(outputs["metrics"], output_dir)
    card_data, context = build(outputs, repo_id, license, written)
    return ModelCard(render(card_data, context))


def check_metadata(card: ModelCard, best: BestRecord) -> None:
    """Parse the card back with huggingface_hub and check what the Hub needs before any upload.

    Raises:
        ConfigError: the metadata does not parse, or lacks a field, or its eval results differ from `best`.
    """
    try:
        parsed = ModelCard(str(card), ignore_metadata_errors=False)
        data = ModelCardData(**parsed.data.to_dict())
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"the rendered model card's metadata is invalid: {err}") from err
    meta = data.to_dict()
    problems = [f"{key}: expected {want!r}, got {meta.get(key)!r}"
                for key, want in (("library_name", "timm"), ("pipeline_tag", TASK[0])) if meta.get(key) != want]
    problems += [f"tags: missing {tag!r}" for tag in TAGS if tag not in (meta.get("tags") or [])]
    if meta.get("base_model") and meta.get("base_model_relation") != "finetune":
        problems.append("base_model_relation: expected 'finetune'")
    _, results = model_index_to_eval_results(meta.get("model-index") or [])
    found = {r.metric_type: r.metric_value for r in results}
    for metric, _, key in EVAL_METRICS:
        want = best.metrics.score(key)
        if metric not in found or abs(found[metric] - want) > 1e-4:
            problems.append(f"model-index {metric}: expected {want:.4f}, got {found.get(metric)}")
    if problems:
        raise ConfigError("the rendered model card's metadata is wrong:\n  " + "\n  ".join(problems))


def write_card(output_dir: str | Path, repo_id: str | None = None, license: str | None = None) -> Path:
    """`render_card`, check the metadata with huggingface_hub's parser, and write output_dir/README.md.

    Raises:
        ConfigError: output_dir is not a finished run, or the rendered metadata does not validate.
    """
    card = render_card(output_dir, repo_id, license)
    best = load_outputs(output_dir)["metrics"].best
    assert best is not None  # render_card refused a run without one
    check_metadata(card, best)
    path = Path(output_dir) / CARD_FILE
    path.write_text(str(card), encoding="utf-8")
    return path


def card_files(output_dir: str | Path) -> list[str]:
    """Paths, relative to output_dir, that the card needs in the Hub repo: README.md and the plots it embeds."""
    out = Path(output_dir)
    return [CARD_FILE] + [name for name in (plots.CONFUSION_MATRIX, plots.TRAINING_CURVES, plots.RELIABILITY)
                          if (out / name).is_file()]


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `hubtune card OUTPUT_DIR [--repo-id ID] [--license L]`."""
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the --output-dir of a finished `hubtune train` run")
    parser.add_argument("--repo-id", default=None, help="Hub repo id (org/name) to put in the usage snippets")
    parser.add_argument("--license", default=None,
                        help="license id (e.g. apache-2.0) when the base model's card gives none")


def run_card(args: argparse.Namespace) -> int:
    """Re-render OUTPUT_DIR/README.md and its plots offline; print the path written.

    Raises:
        ValueError: OUTPUT_DIR lacks metrics.json or config.json, or the card's metadata is invalid.
    """
    path = write_card(args.output_dir, repo_id=args.repo_id, license=args.license)
    print(path)
    return 0
