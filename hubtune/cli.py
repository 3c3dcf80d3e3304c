"""The `hubtune` command line: one table of subcommands; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hubtune.config import ArgumentParser
from hubtune.errors import quiet_broken_pipes, run_guarded, setup_logging
from hubtune.files import CHECKPOINTS_BRANCH


def _train(args: argparse.Namespace) -> int:
    from hubtune.config import from_args
    from hubtune.train import train

    train(from_args(args))
    return 0


def _hub_serve(args: argparse.Namespace) -> int:
    from hubtune.localhub import run_serve

    return run_serve(args)


def _delegate(module: str, runner: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose arguments and body live in `module` (imported only when it runs)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), runner)(args)

    return run


# name, help, module, (add-arguments function, run function)
DELEGATED = [
    ("push", "push a finished run (best model, card, metrics) to the Hub in one verified commit", "hubtune.commands",
     ("add_push_arguments", "run_push")),
    ("prefetch", "download a base model and dataset into the HF cache for runs with HF_HUB_OFFLINE=1",
     "hubtune.commands", ("add_prefetch_arguments", "run_prefetch")),
    ("predict", "classify images (files or whole directories) with a trained model from the Hub or a local folder",
     "hubtune.predict", ("add_predict_arguments", "run_predict")),
    ("evaluate", "evaluate a trained model on a labelled dataset (streamed); optionally add the result to its card",
     "hubtune.evaluation", ("add_evaluate_arguments", "run_evaluate")),
    ("export", "export a trained model to ONNX, checked against PyTorch; optionally add it to the model repo",
     "hubtune.export", ("add_export_arguments", "run_export")),
    ("card", "re-render OUTPUT_DIR/README.md (the model card) and its plots, offline", "hubtune.card",
     ("add_card_arguments", "run_card")),
    ("demo", "the whole story offline in a few minutes: local Hub, fine-tune, interrupt, resume, push, load",
     "hubtune.demo", ("add_demo_arguments", "run_demo")),
    ("reproduce", "rerun a published fine-tune from its recorded config and pinned revisions, and compare",
     "hubtune.reproduce", ("add_reproduce_arguments", "run_reproduce")),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; only the module of the subcommand named in `argv` is imported (torch is slow to load)."""
    from hubtune.config import add_arguments
    from hubtune.version import __version__

    parser = ArgumentParser(prog="hubtune", description="Fine-tune timm image classifiers on the Hub.")
    parser.add_argument("--version", action="version", version=f"hubtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model (same flags as `accelerate launch hubtune/train.py`)",
                       description="Fine-tune a timm image classifier on a streamed dataset.")
    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("summary", help="parameter table per group and a layer summary for a model and freeze spec")
    p.add_argument("model", help="timm architecture, Hub id or local-dir:PATH")
    p.add_argument("--freeze", default="", help="freeze spec, as for `hubtune train --freeze`")
    p.add_argument("--freeze-bn", action="store_true", help="also fix BatchNorm statistics in frozen parts")
    p.add_argument("--unfreeze-at", default="", help="gradual unfreezing schedule, as for `hubtune train --unfreeze-at`")
    p.add_argument("--epochs", type=int, default=None, help="epochs the schedule covers (default: its last one)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="load pretrained weights (default: no, the table does not need them)")
    p.set_defaults(func=_delegate("hubtune.commands", "summary"))

    p = sub.add_parser("checkpoints", help="list the checkpoints of a run (its output dir, or its Hub repo's checkpoint "
                                           "branch): step, epoch, metric, size, best, latest, verified")
    p.add_argument("source", metavar="OUTPUT_DIR|REPO[@BRANCH]",
                   help="the run's --output-dir, or the --push-to-hub repo of a --hub-checkpoints run")
    p.add_argument("--branch", default=CHECKPOINTS_BRANCH, help=f"the checkpoint branch of REPO (default: {CHECKPOINTS_BRANCH})")
    p.set_defaults(func=_delegate("hubtune.commands", "checkpoints"))

    import importlib

    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    for name, help_text, module, (add_args, runner) in DELEGATED:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), add_args)(p)
        p.set_defaults(func=_delegate(module, runner))

    hub = sub.add_parser("hub", help="local Hub-compatible server").add_subparsers(dest="hub_command", required=True)
    p = hub.add_parser("serve", help="serve a Hub-compatible API from a directory (for offline use and tests)")
    if chosen == "hub":
        from hubtune.localhub import add_serve_arguments

        add_serve_arguments(p)
    p.set_defaults(func=_hub_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_broken_pipes()
    setup_logging()
    return run_guarded(lambda: _dispatch(argv))


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
