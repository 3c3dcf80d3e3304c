"""`hubtune reproduce`: rerun a published fine-tune from its train_config.yaml and pinned revisions, then compare."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

import yaml

from hubtune.config import TrainConfig, policy_fields
from hubtune.errors import ConfigError
from hubtune.files import CARD_FILE, METRICS_FILE, TRAIN_CONFIG_FILE
from hubtune.records import EpochRow, RunRecord
from hubtune.sources import is_hub_id, is_local, parse_model_spec

logger = logging.getLogger("hubtune")
COMPARED = ("val_accuracy", "val_f1", "val_loss", "train_loss")
# What a reproduction must not do on its own: push somewhere or continue someone else's checkpoints.


def fetch_record(source: str, revision: str | None = None) -> tuple[dict, RunRecord, dict | None]:
    """(train_config, metrics, card eval results) of a local output dir or a Hub repo."""
    if is_local(source):
        local = Path(source).expanduser()
        files = {name: local / name for name in (TRAIN_CONFIG_FILE, METRICS_FILE, CARD_FILE)}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        from hubtune import hub_calls

        files = {}
        for name in (TRAIN_CONFIG_FILE, METRICS_FILE, CARD_FILE):
            try:
                files[name] = Path(hf_hub_download(source, name, revision=revision))
            except LocalEntryNotFoundError as err:  # no answer (it subclasses EntryNotFoundError: caught first)
                raise hub_calls.unreachable(f"reading {name} of {source}", err) from err
            except EntryNotFoundError:
                files[name] = Path("/nonexistent")
            except (RepositoryNotFoundError, RevisionNotFoundError) as err:
                raise ConfigError(f"{source!r} is neither a local output dir nor a Hub model repo you can read") from err
    for name in (TRAIN_CONFIG_FILE, METRICS_FILE):
        if not files[name].is_file():
            raise ConfigError(f"{source}: no {name}; only runs made by hubtune can be reproduced")
    config = yaml.safe_load(files[TRAIN_CONFIG_FILE].read_text())
    metrics = RunRecord.from_json(json.loads(files[METRICS_FILE].read_text()))
    card = _card_results(files[CARD_FILE]) if files[CARD_FILE].is_file() else None
    return config, metrics, card


def _card_results(readme: Path) -> dict | None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme)
    results = getattr(card.data, "eval_results", None) or []
    return {r.metric_type: r.metric_value for r in results} or None


def plan(config: dict, metrics: RunRecord, output_dir: str) -> tuple[TrainConfig, str, list[str]]:
    """The config to rerun, the equivalent command line, and what it will download."""
    known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**known, **policy_fields("reproduce"), "output_dir": output_dir})
    cfg.validate()
    procs = metrics.num_processes or 1
    launcher = (f"accelerate launch --num_processes {procs} hubtune/train.py" if procs > 1 else "hubtune train")
    command = f"{launcher} --config {shlex.quote(str(Path(output_dir) / 'reproduce_config.yaml'))}"
    downloads = []
    spec = parse_model_spec(cfg.model)
    if spec.kind == "hub" and cfg.pretrained:
        downloads.append(f"model {spec.repo_id}@{cfg.model_revision or spec.revision or 'main'}")
    if is_hub_id(cfg.dataset):
        downloads.append(f"dataset {cfg.dataset}@{cfg.dataset_revision or 'main'} (streamed)")
    return cfg, command, downloads


def _column(row: EpochRow, key: str) -> float:
    return row.train_loss if key == "train_loss" else row.val.score(key)


def compare(original: RunRecord, new: RunRecord, card: dict | None, tol: float = 1e-6) -> list[str]:
    """Differences between the original and the reproduced metrics (empty: reproduced)."""
    diffs = []
    old_h, new_h = original.history, new.history
    if len(old_h) != len(new_h):
        diffs.append(f"epochs run: original {len(old_h)}, reproduction {len(new_h)}")
    for a, b in zip(old_h, new_h):
        for key in COMPARED:
            if abs(_column(a, key) - _column(b, key)) > tol:
                diffs.append(f"epoch {a.epoch} {key}: original {_column(a, key):.6f}, reproduction "
                             f"{_column(b, key):.6f}")
    old_best, new_best = original.best, new.best
    if (old_best and old_best.epoch) != (new_best and new_best.epoch):
        diffs.append(f"best epoch: original {old_best and old_best.epoch}, reproduction {new_best and new_best.epoch}")
    names = {"accuracy": "val_accuracy", "f1": "val_f1", "loss": "val_loss"}
    for metric, value in (card or {}).items():
        column = names.get(metric)
        if column and new_best is not None and abs(value - new_best.metrics.score(column)) > max(tol, 1e-4):
            # (the card rounds to 4 decimals)
            diffs.append(f"card {metric}: {value}, reproduction {new_best.metrics.score(column):.6f}")
    return diffs


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Hub repo id of a hubtune model, or a run's output dir")
    parser.add_argument("--revision", default=None, help="revision of the model repo")
    parser.add_argument("--output-dir", default=None, help="where the reproduction writes (default: reproduce-NAME)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the downloads, run nothing")


def run_reproduce(args: argparse.Namespace) -> int:
    config, metrics, card = fetch_record(args.source, args.revision)
    output_dir = args.output_dir or f"reproduce-{Path(args.source.rstrip('/')).name}"
    cfg, command, downloads = plan(config, metrics, output_dir)
    print(f"command: {command}")
    print("downloads: " + ("; ".join(downloads) if downloads else "none (everything is local)"))
    if args.dry_run:
        return 0
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    cfg.save(Path(output_dir) / "reproduce_config.yaml")
    if (metrics.num_processes or 1) > 1:
        raise ConfigError(f"the original run used {metrics.num_processes} processes; run: {command}")
    from hubtune.train import train

    result = train(cfg)
    diffs = compare(metrics, result.metrics, card)
    if diffs:
        print("differences from the original:\n  " + "\n  ".join(diffs))
        return 1
    best = result.metrics.best
    assert best is not None  # a run that trained evaluated at least one epoch
    print(f"reproduced: {len(result.history)} epochs, best epoch {best.epoch} with "
          f"{cfg.metric} {best.metrics.score(cfg.metric):.6f}, identical to the original")
    return 0
