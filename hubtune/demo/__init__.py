"""`hubtune demo`: the whole workflow in a few minutes on a laptop CPU, against a local Hub, with narration.

It starts the local Hub server, publishes a tiny pre-trained backbone and a synthetic "cats vs dogs" dataset to
it, fine-tunes through the real entry point (`accelerate launch hubtune/train.py`), interrupts that run with
SIGTERM and resumes it, pushes the result, and loads it back in a clean process with hubtune and with plain timm.
Every step that uses the Hugging Face clients runs in a child process whose environment points at the local Hub
(the clients read HF_ENDPOINT when they are imported) and has its own HF_HOME.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.config import ArgumentParser
from hubtune.demo.children import DEMO_TOKEN, DEMO_USER, Children, become_subreaper
from hubtune.demo.narration import say, step
from hubtune.demo.steps import (
    DATASET_REPO,
    FULL,
    MARKER,
    MIN_ACCURACY,
    MODEL_REPO,
    QUICK,
    REAL_HUB_COMMAND,
    SUMMARY_FILE,
    child_env,
    prepare_workdir,
    run_steps,
)
from hubtune.errors import DemoError, run_guarded

if TYPE_CHECKING:
    from hubtune.localhub import LocalHub

__all__ = ["DATASET_REPO", "MARKER", "MIN_ACCURACY", "MODEL_REPO", "SUMMARY_FILE", "DemoError", "add_demo_arguments",
           "main", "prepare_workdir", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `hubtune demo` options to `parser`."""
    parser.add_argument("--workdir", type=Path, default=Path("hubtune-demo"),
                        help="where the Hub storage, data, run outputs and summary go (cleaned on a rerun)")
    parser.add_argument("--keep-server", action="store_true",
                        help="keep the local Hub serving at the end, until Ctrl-C, and print how to use it")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller dataset, backbone pre-training and fewer epochs (for CI); same steps")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if a step failed or the model did not learn, 130 on Ctrl-C (143 on SIGTERM)."""
    from hubtune.localhub import LocalHub

    size, start = (QUICK if args.quick else FULL), time.time()
    hub = children = None
    signals: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        workdir = prepare_workdir(args.workdir)
        become_subreaper()
        step(1, "Starting a local Hub server")
        hub = LocalHub(workdir / "hub", tokens={DEMO_TOKEN: (DEMO_USER, "write")}).start()
        children = Children(child_env(hub.env(DEMO_TOKEN)))
        say(f"Hub-compatible server at {hub.url}, storing repos under {workdir / 'hub'}; user {DEMO_USER!r} has a "
             "write token. Each step below runs in a child process that reaches it through the real huggingface_hub,"
             f" datasets and timm clients (HF_ENDPOINT={hub.url}, its own HF_HOME).")
        timings: dict[str, float] = {}
        summary = run_steps(workdir, size, children, timings)
        timings["total"] = round(time.time() - start, 1)
        problems = []
        if summary["val_accuracy"] < MIN_ACCURACY:
            problems.append(f"best validation accuracy {summary['val_accuracy']:.4f} is below {MIN_ACCURACY}: the "
                            "model did not learn the task; see the epoch lines above and run/metrics.json")
        if not summary["loaders_agree"]:
            problems.append("hubtune's ImageClassifier and plain timm disagree on the pushed model (table above)")
        summary = {"ok": not problems, "problems": problems, "quick": bool(args.quick), "size": asdict(size),
                   "workdir": str(workdir), "hub_url": hub.url, **summary, "timings_s": timings}
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        step(6, "Summary")
        print_summary(summary)
        for problem in problems:
            print(f"hubtune demo: error: {problem}", file=sys.stderr)
        if args.keep_server and not problems:
            keep_serving(hub, workdir)
        return 1 if problems else 0
    except KeyboardInterrupt:
        say("\nhubtune demo: interrupted; stopping the running step and the local Hub")
        return 128 + signals[0] if signals else 130
    finally:
        if children is not None:
            children.stop()
        if hub is not None:
            hub.stop()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def print_summary(summary: dict[str, Any]) -> None:
    t, paths = summary["timings_s"], summary["paths"]
    say(f"Done in {t['total']:.0f}s (publish {t['publish']:.0f}s, training {t['train_interrupted']:.0f}s + "
         f"{t['train_resumed']:.0f}s after the resume, loading and predicting {t['predict']:.0f}s).\n"
         f"Best validation accuracy {summary['val_accuracy']:.4f} (epoch {summary['best']['epoch']} of "
         f"{summary['epochs']}); interrupted after {summary['interrupt']['after_checkpoint']} and resumed from step "
         f"{summary['resumed_from_step']}; {summary['heldout_correct']}/{summary['heldout_total']} held-out images "
         f"right; hubtune and plain timm {'agree' if summary['loaders_agree'] else 'DISAGREE'}.\n"
         f"  model card   {paths['model_card']} (plots in {Path(paths['output_dir']) / 'plots'})\n"
         f"  checkpoints  {Path(paths['output_dir']) / 'checkpoints'}\n"
         f"  Hub repo     {summary['hub_url']}/{summary['repo_id']} (storage {paths['hub_storage']})\n"
         f"  commit       {summary['commit_url']}\n"
         f"  summary      {Path(summary['workdir']) / SUMMARY_FILE}\n"
         f"The same run on the real Hub, with a real backbone and dataset:\n  {REAL_HUB_COMMAND}")


def keep_serving(hub: LocalHub, workdir: Path) -> None:
    """Serve until Ctrl-C (or SIGTERM), after printing the environment a client needs."""
    say(f"\nThe local Hub keeps serving at {hub.url}; Ctrl-C stops it. To use it from another shell:")
    for key, value in hub.env(DEMO_TOKEN).items():
        say(f"  export {key}={shlex.quote(value)}")
    say(f"  hubtune predict {MODEL_REPO} {workdir / 'heldout'}/*.jpg")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping the local Hub")


def main(argv: list[str] | None = None) -> int:
    """`python -m hubtune.demo [--workdir DIR] [--quick] [--keep-server]`."""
    parser = ArgumentParser(prog="python -m hubtune.demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return run_guarded(lambda: run_demo(parser.parse_args(argv)))
