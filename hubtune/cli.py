"""The `hubtune` command line: one table of subcommands; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hubtune.config import ArgumentParser
from hubtune.errors import quiet_broken_pipes, run_guarded, setup_logging


def _train(args: argparse.Namespace) -> int:
    from hubtune.config import from_args
    from hubtune.train import train

    train(from_args(args))
    return 0


def _summary(args: argparse.Namespace) -> int:
    import torch

    from hubtune import model as model_lib

    net = model_lib.create(args.model, num_classes=args.num_classes, pretrained=args.pretrained)
    frozen = model_lib.resolve_freeze(net, args.freeze) if args.freeze else []
    model_lib.freeze(net, frozen, args.freeze_bn)
    size = model_lib.data_config(net, args.image_size)["input_size"]
    print(f"{args.model}: input {tuple(size)}, {len(frozen)} frozen parameter tensors")
    print(model_lib.format_table(model_lib.parameter_table(net)))
    print("\nlayers (group, module, type, parameters, trainable):")
    groups = model_lib.param_groups(net)
    for name, module in net.named_modules():
        counted = model_lib.counted_parameters(module, recurse=False)
        if not counted:
            continue
        n = sum(k for k, _ in counted)
        trainable = "yes" if all(t for _, t in counted) else "no"
        group = groups.get(f"{name}.weight", groups.get(f"{name}.bias", ""))
        kind = type(module).__name__ + (" (fixed)" if model_lib.has_fixed_statistics(module) else "")
        print(f"  {group:<10} {name:<40} {kind:<20} {n:>10,} {trainable}")
    with torch.no_grad():
        feats = model_lib.as_timm(net).forward_features(torch.zeros(1, *size))
    print(f"\nfeature map for one {tuple(size)} image: {tuple(feats.shape)}")
    if args.unfreeze_at:
        from hubtune import unfreeze
        from hubtune.config import TrainConfig

        cfg = TrainConfig(freeze=args.freeze, freeze_bn=args.freeze_bn, unfreeze_at=args.unfreeze_at)
        cfg.validate()
        schedule = unfreeze.resolve_schedule(net, cfg, frozen)
        epochs = args.epochs or max(epoch for epoch, _, _ in schedule)
        print("\nschedule (--unfreeze-at):")
        print("\n".join("  " + line for line in unfreeze.describe(net, schedule, frozen, epochs)))
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hubtune import checkpoint

    root = Path(args.source)
    if root.is_dir() or "/" not in args.source or args.source.count("/") > 1:
        rows, where = checkpoint.describe(root), str(root / checkpoint.CHECKPOINTS)
    else:
        from hubtune import hub_checkpoints
        from hubtune.errors import ConfigError
        from hubtune.sources import repo_id_problem, revision_problem

        repo_id, _, branch = args.source.partition("@")
        problem = repo_id_problem(repo_id) or revision_problem(branch or args.branch)
        if problem:
            raise ConfigError(f"{args.source!r}: {problem}; expected OUTPUT_DIR or REPO[@BRANCH]")
        rows = hub_checkpoints.describe_remote(repo_id, branch or args.branch)
        where = f"{repo_id}@{branch or args.branch}/{hub_checkpoints.REMOTE_DIR}"
    if not rows:
        print(f"no checkpoints in {where}")
        return 0
    header = ("checkpoint", "step", "position", "metric", "size", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
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
    ("push", "push a finished run (best model, card, metrics) to the Hub in one verified commit", "hubtune.hub",
     ("add_push_arguments", "run_push")),
    ("prefetch", "download a base model and dataset into the HF cache for runs with HF_HUB_OFFLINE=1",
     "hubtune.hub", ("add_prefetch_arguments", "run_prefetch")),
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
    p.set_defaults(func=_summary)

    p = sub.add_parser("checkpoints", help="list the checkpoints of a run (its output dir, or its Hub repo's checkpoint "
                                           "branch): step, epoch, metric, size, best, latest, verified")
    p.add_argument("source", metavar="OUTPUT_DIR|REPO[@BRANCH]",
                   help="the run's --output-dir, or the --push-to-hub repo of a --hub-checkpoints run")
    p.add_argument("--branch", default="checkpoints", help="the checkpoint branch of REPO (default: checkpoints)")
    p.set_defaults(func=_checkpoints)

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
