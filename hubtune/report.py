"""What a finished run leaves behind: metrics.json, the run record for the card, the Hub-ready folder."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hubtune import data
from hubtune import model as model_lib
from hubtune.config import TrainConfig
from hubtune.files import METRICS_FILE, TRAIN_CONFIG_FILE
from hubtune.records import RunInfo, RunRecord, Skipped
from hubtune.run_state import RunState


def write_outputs(folder: Path, net: Any, cfg: TrainConfig, data_cfg: dict, result: RunRecord) -> None:
    """The Hub-ready folder: timm export, metrics.json, train_config.yaml and the model card with its plots."""
    from hubtune import card

    model_lib.export(net, folder, result.class_names, data_cfg,
                     temperature=result.calibration.temperature if result.calibration else None)
    (folder / METRICS_FILE).write_text(json.dumps(result.to_json(), indent=2))
    cfg.save(folder / TRAIN_CONFIG_FILE)
    card.write_card(folder, repo_id=cfg.push_to_hub, license=cfg.license)


@dataclass(frozen=True)
class RunSettings:
    """The settings run_info records, taken from the config by job.py (so the config stays there)."""

    model: str
    dataset: str
    freeze: str
    freeze_bn: bool
    mixed_precision: str | None
    batch_size: int
    grad_accum: int


def run_info(cfg: RunSettings, accelerator: Accelerator, net: Any, frozen: list[str], base_model: dict,
             info: data.DataInfo, command: str) -> dict:
    """What the model card needs to make the run reproducible."""
    import accelerate
    import datasets
    import huggingface_hub
    import timm

    from hubtune.version import __version__

    total = model_lib.parameter_table(net)[-1]
    groups = model_lib.param_groups(net)
    device = accelerator.device
    return {
        "base_model": {"id": None, "revision": None, "spec": cfg.model, "license": None, **base_model},
        "dataset": {"id": cfg.dataset, "revision": info.revision, "is_hub": info.revision is not None},
        "val_source": info.val_source.to_json(),
        "parameters": {"total": total[1], "trainable": total[2], "frozen": total[3]},
        "frozen_groups": sorted({groups[n] for n in frozen if n in groups}),
        "freeze": cfg.freeze,
        "freeze_bn": cfg.freeze_bn,
        "devices": {"type": device.type, "count": accelerator.num_processes,
                    "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "mixed_precision": cfg.mixed_precision,
        "effective_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__, "huggingface_hub": huggingface_hub.__version__,
                     "hubtune": __version__},
        "command": command,
    }


def final_metrics(state: RunState, info: data.DataInfo, accelerator: Accelerator, started: float,
                  run_info: dict) -> RunRecord:
    """metrics.json: history, best, stop reason, counts, and the wall time of every segment of the run together
    (`started`: when this process's segment began; a resumed run adds the time its checkpoint recorded)."""
    last = state.history[-1] if state.history else None
    return RunRecord(
        history=list(state.history), best=state.best, stopped=state.stopped,
        train_examples=last.train_examples if last else 0, val_examples=last.val_examples if last else 0,
        examples_seen=state.examples_seen, skipped=last.skipped if last else Skipped(),
        global_step=state.global_step, class_names=info.class_names, dataset_revision=info.revision,
        num_processes=accelerator.num_processes, wall_time_s=round(state.elapsed_s + time.time() - started, 2),
        segments=state.segments + 1, run_info=RunInfo.from_json(run_info),
    )


def resume_command(mixed_precision: str | None = None) -> str:
    """The command line that started this run, without --resume, for the message after an interruption.

    `mixed_precision`: the run's resolved mode; when it came from the launcher (no --mixed-precision flag), it is
    added as the flag, so that the command trains as this run did whatever launcher runs it.
    """
    args = list(sys.argv[1:])
    if "--resume" in args:
        i = args.index("--resume")
        del args[i : i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    given = any(a == "--mixed-precision" or a.startswith("--mixed-precision=") for a in args)
    if mixed_precision not in (None, "no") and not given:
        args += ["--mixed-precision", mixed_precision]
    if Path(sys.argv[0]).name == "train.py":
        launched = os.environ.get("WORLD_SIZE") or any(k.startswith("ACCELERATE_") for k in os.environ)
        head = "accelerate launch -q hubtune/train.py" if launched else "python -m hubtune.train"
    else:
        head = "hubtune"
    return " ".join([head, *(shlex.quote(a) for a in args)])
