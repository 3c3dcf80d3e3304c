"""`hubtune demo` from start to end: the local Hub, the steps, the summary and what to do next; Ctrl-C and SIGTERM."""

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
from hubtune.demo.snippets import client_exports, load_snippets, serve_command
from hubtune.demo.steps import (
    FULL,
    MIN_ACCURACY,
    MODEL_REPO,
    QUICK,
    REAL_HUB_COMMAND,
    SUMMARY_FILE,
    child_env,
    default_workdir,
    prepare_workdir,
    run_steps,
)
from hubtune.errors import run_guarded
from hubtune.files import CHECKPOINTS_DIR, PLOTS_DIR

if TYPE_CHECKING:
    from hubtune.localhub import LocalHub

DESCRIPTION = "the whole story offline in a few minutes: local Hub, fine-tune, interrupt, resume, push, load"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `hubtune demo` options to `parser`."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the Hub storage, data, run outputs and summary go, cleaned on a rerun "
                             "(default: $HF_HOME/hubtune/demo, i.e. ~/.cache/huggingface/hubtune/demo)")
    parser.add_argument("--keep-server", action="store_true",
                        help="keep the local Hub serving at the end, until Ctrl-C, and print how to use it")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller dataset, shorter backbone pre-training and fewer epochs; the same steps")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if a step failed or the model did not learn, 130 on Ctrl-C (143 on SIGTERM)."""
    from hubtune.localhub import LocalHub

    size, start = (QUICK if args.quick else FULL), time.time()
    hub: LocalHub | None = None
    children: Children | None = None
    signals: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)
        if len(signals) > 1 and children is not None:
            children.kill()  # a second Ctrl-C while the running step is being stopped: do not wait for it
            return
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        workdir = prepare_workdir(args.workdir or default_workdir())
        become_subreaper()
        step(1, "Starting a local Hub server")
        hub = LocalHub(workdir / "hub", tokens={DEMO_TOKEN: (DEMO_USER, "write")}).start()
        children = Children(child_env(hub.env(DEMO_TOKEN)))
        say(f"Hub-compatible server at {hub.url}, storing repos under {workdir / 'hub'}; user {DEMO_USER!r} has a "
             "write token. Each step below runs in a child process that reaches it through the real huggingface_hub,"
             f" datasets, timm and transformers clients (HF_ENDPOINT={hub.url}, its own HF_HOME).")
        timings: dict[str, float] = {}
        summary = run_steps(workdir, size, children, timings)
        timings["total"] = round(time.time() - start, 1)
        problems = []
        if summary["val_accuracy"] < MIN_ACCURACY:
            problems.append(f"best validation accuracy {summary['val_accuracy']:.4f} is below {MIN_ACCURACY}: the "
                            "model did not learn the task; see the epoch lines above and run/metrics.json")
        if not summary["loaders_agree"]:
            problems.append(f"{', '.join(summary['libraries'])} disagree on the pushed model (table above)")
        summary = {"ok": not problems, "problems": problems, "quick": bool(args.quick), "size": asdict(size),
                   "workdir": str(workdir), "hub_url": hub.url, **summary, "timings_s": timings,
                   "what_now": what_now_commands(workdir)}
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        step(6, "Summary")
        print_summary(summary)
        for problem in problems:
            print(f"hubtune demo: error: {problem}", file=sys.stderr, flush=True)
        step(7, "What now")
        print_what_now(summary["what_now"], workdir, summary["libraries"])
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def print_summary(summary: dict[str, Any]) -> None:
    t, paths = summary["timings_s"], summary["paths"]
    say(f"Done in {t['total']:.0f}s (publish {t['publish']:.0f}s, of which pre-training the backbone "
         f"{summary['backbone']['pretrain_s']:.0f}s; training {t['train_interrupted']:.0f}s + "
         f"{t['train_resumed']:.0f}s after the resume; loading and predicting {t['load']:.0f}s).\n"
         f"Best validation accuracy {summary['val_accuracy']:.4f} (epoch {summary['best']['epoch']} of "
         f"{summary['epochs']}); interrupted after {summary['interrupt']['after_checkpoint']} and resumed from step "
         f"{summary['resumed_from_step']}; {summary['heldout_correct']}/{summary['heldout_total']} held-out images "
         f"right; {', '.join(summary['libraries'])} {'agree' if summary['loaders_agree'] else 'DISAGREE'}.\n"
         f"  model card   {paths['model_card']} (plots in {Path(paths['output_dir']) / PLOTS_DIR})\n"
         f"  checkpoints  {Path(paths['output_dir']) / CHECKPOINTS_DIR}\n"
         f"  Hub repo     {summary['hub_url']}/{summary['repo_id']} (storage {paths['hub_storage']})\n"
         f"  commit       {summary['commit_url']}\n"
         f"  summary      {Path(summary['workdir']) / SUMMARY_FILE}\n"
         f"The same run on the real Hub, with a real backbone and dataset:\n  {REAL_HUB_COMMAND}")


def what_now_commands(workdir: Path) -> dict[str, Any]:
    """The commands and code `print_what_now` shows (the load snippets are the ones step 5 ran)."""
    return {"serve": serve_command(workdir / "hub", DEMO_USER), "exports": client_exports(),
            "snippets": load_snippets(MODEL_REPO, workdir / "heldout"),
            "predict": shlex.join(["hubtune", "predict", MODEL_REPO, str(workdir / "heldout")])}


def print_what_now(what: dict[str, Any], workdir: Path, ran: list[str]) -> None:
    say(f"The local Hub stopped with the demo; its repos stay in {workdir / 'hub'}. To serve them again (it prints "
         f"a write token for {DEMO_USER!r}, to push), in one shell:\n  {what['serve']}\n"
         "and in another, before starting Python (the Hugging Face clients read these when they are imported):\n"
         f"  {what['exports']}\n"
         f"Then classify images from the shell:\n  {what['predict']}\n"
         "or load the model in Python with hubtune, timm or transformers (step 5 ran exactly this code):")
    for library, code in what["snippets"].items():
        note = "" if library in ran else f" (not run here: {library} is not installed; pip install {library})"
        say(f"\n# --- {library} ---{note}\n{code.rstrip()}")


def keep_serving(hub: LocalHub, workdir: Path) -> None:
    """Serve until Ctrl-C (or SIGTERM), after printing the environment a client needs."""
    say(f"\n--keep-server: the demo's own Hub keeps serving at {hub.url} until Ctrl-C; instead of the two lines "
         "above, in another shell:")
    for key, value in hub.env(DEMO_TOKEN).items():
        say(f"  export {key}={shlex.quote(value)}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping the local Hub")


def main(argv: list[str] | None = None) -> int:
    """`python -m hubtune.demo [--workdir DIR] [--quick] [--keep-server]`."""
    parser = ArgumentParser(prog="python -m hubtune.demo", description=DESCRIPTION)
    add_demo_arguments(parser)
    return run_guarded(lambda: run_demo(parser.parse_args(argv)))
