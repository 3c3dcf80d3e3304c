"""`hubtune evaluate`: a trained classifier on anyone's labelled data, streamed, every example counted once.

The model comes from the Hub (any revision), a local export, or any timm-format repo with label names; the dataset
is read as training reads it (streamed, the same decoding, broken images skipped and counted). Labels are matched
to the model's label names by name, never by index (`--label-map` renames classes). Several processes
(`accelerate launch -m hubtune.cli evaluate ...`) each read their own shard; the sums are reduced. `--push` adds
the result to the model repo's card as a new model-index entry, keeping what the card already says.

A local folder or parquet file is the evaluation set the user points at: without a test or validation split, its
only split is evaluated (class subfolders without train/ and test/, which datasets calls "train"); a Hub dataset
with only a train split is refused, as that is training data. An --output-dir holding an earlier evaluation is
refused unless --overwrite-output-dir, as `hubtune train` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hubtune.errors import MAX_BAD_FRACTION, ConfigError, DataError, OutputDirError, check_bad_fraction
from hubtune.files import CARD_FILE, atomic_write, unwritable
from hubtune.records import EvalMetrics, per_class_json
from hubtune.sources import is_commit, parse_model_spec

logger = logging.getLogger("hubtune")

RESULTS_FILE = "eval_results.json"
CONFUSION_PLOT = "eval_confusion_matrix.png"
RELIABILITY_PLOT = "eval_reliability_diagram.png"
EVAL_FILES = (RESULTS_FILE, CONFUSION_PLOT, RELIABILITY_PLOT)  # what an evaluation writes in --output-dir
TTA = "hflip"  # --tta: the image and its mirror image, logits averaged (timm's train.py --tta reduction)
TASK = ("image-classification", "Image Classification")
PUSHED_METRICS = (("accuracy", "Accuracy"), ("f1", "F1 (macro)"), ("ece", "ECE"))  # model-index entries of --push


def parse_label_map(spec: str | None) -> dict[str, str]:
    """`--label-map kitty=cat,puppy=dog` as {dataset label: model label}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ConfigError(f"--label-map: got {item!r}, expected DATASET_LABEL=MODEL_LABEL[,...]")
        mapping[source.strip()] = target.strip()
    return mapping


def match_labels(dataset_names: list[str], model_names: list[str], label_map: dict[str, str]) -> list[int]:
    """For each dataset class index, the model's class index with the same name (after `label_map`).

    Raises:
        DataError: a dataset class (or a --label-map entry) names no class of the model; both lists are shown.
    """
    unknown_map = sorted(set(label_map) - set(dataset_names))
    if unknown_map:
        raise DataError(f"--label-map renames {unknown_map}, which the dataset does not have; dataset labels: "
                        f"{dataset_names}")
    index = {name: i for i, name in enumerate(model_names)}
    renamed = [label_map.get(name, name) for name in dataset_names]
    missing = [f"{name!r}" + (f" (mapped to {label_map[name]!r})" if name in label_map else "")
               for name, target in zip(dataset_names, renamed) if target not in index]
    if missing:
        raise DataError(f"dataset labels {', '.join(missing)} are not labels of the model; dataset labels: "
                        f"{dataset_names}, model labels: {model_names}; rename them with --label-map "
                        "dataset_label=model_label,...")
    return [index[name] for name in renamed]


@dataclass(frozen=True)
class EvalRequest:
    """What `hubtune evaluate` evaluates, on which data, how, and where the result goes; the defaults are the CLI's."""

    model: str  # Hub repo (org/name[@rev]) or local export
    dataset: str  # Hub dataset id, local imagefolder or parquet file(s)
    revision: str | None = None  # of the model
    split: str | None = None  # None: test, else validation (else a local dataset's only split)
    dataset_revision: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)  # {dataset label: model label} (parse_label_map)
    batch_size: int = 64
    num_workers: int = 2
    max_bad_fraction: float = MAX_BAD_FRACTION
    output_dir: str = "evaluation"
    tta: bool = False
    push: bool = False  # add the result to the model repo's card
    trust_pickled_weights: bool = False


def evaluate_model(args: EvalRequest) -> dict[str, Any]:
    """Evaluate args.model on args.dataset; the main process writes eval_results.json and the plot, and pushes."""
    import torch
    from accelerate import Accelerator

    from hubtune import data, metrics, plots, stream
    from hubtune import model as model_lib
    from hubtune.classifier import ImageClassifier
    from hubtune.job import _cpu_only_launch

    label_map = dict(args.label_map)
    accelerator = Accelerator(cpu=_cpu_only_launch())
    clf = ImageClassifier.from_pretrained(args.model, args.revision, device=accelerator.device,
                                          trust_pickled_weights=args.trust_pickled_weights)
    if args.push and clf.revision is None:
        raise ConfigError(f"--push adds the result to a Hub model repo's card; {args.model!r} is a local directory")
    split, info = data.open_eval_split(args.dataset, args.split, args.dataset_revision, args.image_column,
                                       args.label_column)
    chosen = info.val_source.name
    if not args.split and chosen not in data.EVAL_SPLIT_NAMES and accelerator.is_main_process:
        logger.info(f"--dataset {args.dataset!r} is local, with one split ({chosen!r}) and no test or validation "
                    "split: evaluating all of it")
    targets = torch.tensor(match_labels(info.class_names, clf.label_names, label_map))
    data_cfg = clf.data_config
    _, eval_tf = model_lib.transforms(data_cfg)
    prepare = model_lib.Normalize(data_cfg, accelerator.device)
    source = data.process_source(split, info, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes, shuffle_seed=None)
    ds = stream.ExampleStream(source, eval_tf, keep_val=None, val_fraction=0.0, seed=None, shuffle_buffer=256)
    loader = stream.make_loader(ds, args.batch_size, args.num_workers, accelerator.device.type == "cuda")
    started = time.time()
    with torch.inference_mode():
        # raw logits and the temperature apart: the result has the ECE and loss with and without it
        result = metrics.evaluate(lambda b: clf.logits(prepare(b.images()), args.tta, calibrated=False),
                                  loader, accelerator, clf.label_names, targets=targets, temperature=clf.temperature)
    check_bad_fraction(result.skipped, result.examples + result.skipped, args.max_bad_fraction, "evaluation")
    if result.examples == 0:
        raise DataError(f"--dataset {args.dataset!r} split {info.val_source.to_json()!r} has no decodable image to evaluate")
    record = _record(args, clf, info, label_map, result, accelerator.num_processes, time.time() - started)
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        try:
            atomic_write(out / RESULTS_FILE, json.dumps(record, indent=2), fsync=False)
            plots.confusion_matrix(result.confusion_matrix, clf.label_names, out / CONFUSION_PLOT)
            calibration = record["calibration"]
            series = [("model" if clf.temperature is None else f"with temperature {clf.temperature:.3f}",
                       calibration["bins"], calibration["ece"])]
            if clf.temperature is not None:
                series.append(("without the temperature", calibration["uncalibrated"]["bins"],
                               calibration["uncalibrated"]["ece"]))
            plots.reliability_diagram(series, out / RELIABILITY_PLOT, f"Reliability on {args.dataset} "
                                      f"({record['dataset']['split']}){' with flip TTA' if args.tta else ''}")
        except OSError as err:
            raise OutputDirError(f"--output-dir {args.output_dir!r} cannot be written ({err.strerror or err}); give "
                                 "a writable directory") from err
        print(format_table(record))
        print(f"wrote {out / RESULTS_FILE}, {out / CONFUSION_PLOT} and {out / RELIABILITY_PLOT}")
        if args.push:
            spec = parse_model_spec(args.model, args.revision)
            branch = spec.revision if spec.revision and not is_commit(spec.revision) else None
            print(push_result(record, spec.hub_repo_id, branch))
    accelerator.wait_for_everyone()
    return record


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse an --output-dir that cannot be written, or that holds an earlier evaluation (unless `overwrite`).

    Raises:
        OutputDirError: it is a file, not writable, or holds eval_results.json or the plot of an earlier evaluation.
    """
    problem = unwritable(Path(output_dir), directory=True)
    if problem:
        raise OutputDirError(f"--output-dir {output_dir!r} cannot be written: {problem}; give a writable directory")
    earlier = [name for name in EVAL_FILES if (Path(output_dir) / name).exists()]
    if earlier and not overwrite:
        raise OutputDirError(f"--output-dir {output_dir!r} holds an earlier evaluation ({', '.join(earlier)}); pass "
                             "--overwrite-output-dir to replace it, or give another --output-dir")


def _record(args: EvalRequest, clf: Any, info: Any, label_map: dict[str, str], result: EvalMetrics,
            processes: int, seconds: float) -> dict[str, Any]:
    import accelerate
    import datasets
    import huggingface_hub
    import timm
    import torch

    from hubtune import metrics as metrics_lib
    from hubtune.version import __version__

    calibration: dict[str, Any] = {"n_bins": metrics_lib.N_BINS, "ece": result.ece,
                                   "bins": metrics_lib.describe_bins(result.calibration_bins),
                                   "temperature": clf.temperature}
    if result.uncalibrated is not None:  # the model's temperature applied: what timm and transformers users get
        raw = result.uncalibrated
        calibration["uncalibrated"] = {"ece": raw.ece, "loss": raw.loss,
                                       "bins": metrics_lib.describe_bins(raw.calibration_bins)}
    intervals = metrics_lib.bootstrap_intervals(torch.tensor(result.confusion_matrix))
    return {
        "model": {"source": args.model, "revision": clf.revision, "labels": clf.label_names},
        "dataset": {"id": args.dataset, "revision": info.revision, "split": info.val_source.name,
                    "labels": info.class_names, "label_map": label_map},
        "metrics": {"accuracy": result.accuracy, "f1": result.f1, "loss": result.loss, "ece": result.ece},
        "confidence_intervals": {"method": "percentile bootstrap over the examples",
                                 "level": metrics_lib.CONFIDENCE_LEVEL, "resamples": metrics_lib.BOOTSTRAP_RESAMPLES,
                                 "seed": metrics_lib.BOOTSTRAP_SEED, **intervals},
        "calibration": calibration, "tta": TTA if args.tta else None,
        "per_class": per_class_json(result.per_class), "confusion_matrix": result.confusion_matrix,
        "examples": result.examples, "skipped_images": result.skipped, "num_processes": processes,
        "seconds": round(seconds, 2),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__, "huggingface_hub": huggingface_hub.__version__,
                     "hubtune": __version__},
    }


def format_table(record: dict[str, Any]) -> str:
    """The short summary printed after an evaluation."""
    m, ds, ci, cal = record["metrics"], record["dataset"], record["confidence_intervals"], record["calibration"]
    level = f"{ci['level']:.0%}"
    lines = [(f"{record['model']['source']} on {ds['id']} ({ds['split']}): {record['examples']} images, "
              f"{record['skipped_images']} skipped" + (" | flip TTA" if record["tta"] else "")),
             f"accuracy {m['accuracy']:.4f} | macro F1 {m['f1']:.4f} | loss {m['loss']:.4f} | ECE {m['ece']:.4f}",
             (f"{level} bootstrap intervals: accuracy [{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}] | macro F1 "
              f"[{ci['f1'][0]:.4f}, {ci['f1'][1]:.4f}]")]
    if cal["temperature"] is not None:
        lines.append(f"temperature {cal['temperature']:.4f} applied (from the model's config.json); without it: loss "
                     f"{cal['uncalibrated']['loss']:.4f} | ECE {cal['uncalibrated']['ece']:.4f}")
    lines.append(f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    lines += [f"{name[:23]:<24}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10}"
              for name, row in record["per_class"].items()]
    return "\n".join(lines)


def push_result(record: dict[str, Any], repo_id: str, revision: str | None) -> str:
    """Add the result to the card of `repo_id` as a new model-index entry, in one verified commit.

    Raises:
        PushError: the card cannot be read or written (no write access: 401/403), after retries.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hubtune import hub

    client = hub.api()
    ds = record["dataset"]
    card = None
    with hub.push_errors(repo_id, "reading the card"):
        if client.file_exists(repo_id, CARD_FILE):
            # RepoCard.load's hint says str, but it hands the token to hf_hub_download, which takes a bool too
            card = ModelCard.load(repo_id, token=client.token)  # type: ignore[arg-type]
    card = card or ModelCard(f"---\nlibrary_name: timm\n---\n# {repo_id}\n")
    # a ModelCard's data is a ModelCardData (its card_data_class); RepoCard types it as the base CardData
    card_data = cast(ModelCardData, card.data)
    results = list(card_data.eval_results or [])
    # how the numbers were made, when not by the plain model: flip TTA, the temperature of config.json
    temperature = record["calibration"]["temperature"]
    how = ", ".join(([f"tta={record['tta']}"] if record["tta"] else [])
                    + ([f"temperature={temperature:.4g}"] if temperature is not None else [])) or None
    results += [EvalResult(task_type=TASK[0], task_name=TASK[1], dataset_type=ds["id"], dataset_name=ds["id"],
                           dataset_split=ds["split"], dataset_revision=ds["revision"], metric_type=metric,
                           metric_name=f"{name} ({record['calibration']['n_bins']} bins)" if metric == "ece" else name,
                           metric_value=round(record["metrics"][metric], 4), metric_config=how)
                for metric, name in PUSHED_METRICS]
    card_data.eval_results = results
    card_data.model_name = card_data.model_name or repo_id.split("/")[-1]
    target = hub.PushTarget(repo_id, revision=revision, overwrite_card=True,  # the card read above, with the result
                            commit_message=f"hubtune evaluate: {ds['id']} ({ds['split']})")
    url = hub.push_files(target, {CARD_FILE: str(card).encode()})
    return f"added the result to the card of {repo_id}: {url}"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hubtune evaluate` arguments."""
    parser.add_argument("model", help="Hub repo (org/name[@rev]), a local export, or any timm repo with label names")
    parser.add_argument("--dataset", required=True, help="Hub dataset id, or a local imagefolder or parquet file(s)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: test, else validation)")
    parser.add_argument("--dataset-revision", default=None, help="dataset branch, tag or commit")
    parser.add_argument("--revision", default=None, help="model revision on the Hub (default: main)")
    parser.add_argument("--image-column", default=None, help="image column (default: the Image feature)")
    parser.add_argument("--label-column", default=None, help="label column (default: the ClassLabel feature)")
    parser.add_argument("--label-map", default=None, metavar="DATASET_LABEL=MODEL_LABEL,...",
                        help="rename dataset classes to the model's label names")
    parser.add_argument("--batch-size", type=int, default=EvalRequest.batch_size,
                        help="images per forward pass and process")
    parser.add_argument("--num-workers", type=int, default=EvalRequest.num_workers,
                        help="data loader worker processes per process")
    parser.add_argument("--max-bad-fraction", type=float, default=EvalRequest.max_bad_fraction,
                        help="fail if more than this fraction of images cannot be decoded")
    parser.add_argument("--output-dir", default=EvalRequest.output_dir, help="where eval_results.json and the plot go")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="replace the eval_results.json and plot of an earlier evaluation in --output-dir instead "
                             "of refusing to start")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the logits of each image and its mirror image (flipped "
                             "left to right), as timm's --tta averages its copies")
    parser.add_argument("--push", action="store_true",
                        help="add the result to the model repo's card (model-index), in one verified commit")
    parser.add_argument("--trust-pickled-weights", action="store_true",
                        help="allow pickled weights when the repo has no model.safetensors (only for trusted sources)")


def run_evaluate(args: argparse.Namespace) -> int:
    for name in ("batch_size", "num_workers"):
        if getattr(args, name) < (1 if name == "batch_size" else 0):
            raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected an integer >= "
                              f"{1 if name == 'batch_size' else 0}")
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    evaluate_model(EvalRequest(
        args.model, args.dataset, revision=args.revision, split=args.split, dataset_revision=args.dataset_revision,
        image_column=args.image_column, label_column=args.label_column, label_map=parse_label_map(args.label_map),
        batch_size=args.batch_size, num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction,
        output_dir=args.output_dir, tta=args.tta, push=args.push, trust_pickled_weights=args.trust_pickled_weights))
    return 0
