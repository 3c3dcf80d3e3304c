"""Experiment tracking through Accelerate's trackers (`--report-to`): TensorBoard, trackio, W&B, MLflow, Comet, Aim.

Each tracker is started on its own, so one that is missing or cannot start (no login, no network) costs a one-line
warning and the others go on. Steps are optimizer steps, so a resumed run continues its curves; TensorBoard writes
into OUTPUT_DIR/runs/ (pushed with the model: the Hub's "Training metrics" tab) and, on resume, hides whatever a
killed process logged after its last checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from hubtune.errors import ConfigError

logger = logging.getLogger("hubtune")

RUNS_DIR = "runs"
PROJECT = "hubtune"  # TensorBoard writes into OUTPUT_DIR/runs/hubtune/
# --report-to name -> the package that provides it
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def default_report_to() -> str:
    """tensorboard when it is installed, else none."""
    return "tensorboard" if installed("tensorboard") else "none"


def parse_report_to(spec: str) -> list[str]:
    """The trackers a --report-to value names ("all": every installed one; "none": none), in order.

    Raises:
        ConfigError: a name is not a tracker hubtune knows.
    """
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
    if unknown or not names:
        raise ConfigError(f"--report-to {spec!r}: expected a comma list of {', '.join(TRACKERS)}, or all or none")
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"--report-to {spec!r}: 'none' cannot be combined with trackers")
        return []
    if "all" in names:
        return [n for n in TRACKERS if installed(n)]
    return list(dict.fromkeys(names))


def available(names: list[str]) -> list[str]:
    """The trackers whose package is installed; a one-line warning for each that is not."""
    for name in names:
        if not installed(name):
            logger.warning(f"--report-to {name}: the {TRACKERS[name]} package is not installed (pip install "
                           f"{TRACKERS[name]}); training goes on without it")
    return [n for n in names if installed(n)]


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the trackers take it (bool, str, int, float; None as "none")."""
    return {k: ("none" if v is None else v) for k, v in config.items() if isinstance(v, (bool, str, int, float))
            or v is None}


def start(accelerator: Any, config: dict[str, Any], resume_step: int) -> list[str]:
    """Start each tracker in `accelerator.log_with` on its own; return the names that started.

    `resume_step`: the optimizer step a resumed run continues from; TensorBoard hides events after it (a killed
    process may have logged steps past its last checkpoint, which the resumed run logs again).
    """
    wanted = [str(t) for t in accelerator.log_with]
    started = []
    for name in wanted:
        kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step else {}
        before = list(accelerator.trackers)
        accelerator.log_with = [name]
        try:
            accelerator.init_trackers(PROJECT, config=hyperparameters(config), init_kwargs=kwargs)
            started.append(name)
        except Exception as err:  # noqa: BLE001 - a tracker that cannot start must not stop training
            accelerator.trackers = before
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.warning(f"--report-to {name}: could not start ({type(err).__name__}: {first}); training goes on "
                           "without it")
    accelerator.log_with = started
    return started
