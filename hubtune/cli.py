"""The `hubtune` command line: one table of subcommands; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

EXIT_USAGE = 2
EXIT_FAILED = 1


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run `fn`; known user-facing failures become one line on stderr and a non-zero exit code."""
    from hubtune.checkpoint import CheckpointError
    from hubtune.run_state import TrainingInterrupted
    from hubtune.train import BadDataError

    try:
        result = fn()
    except TrainingInterrupted as stop:
        print(f"hubtune: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("hubtune: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, BadDataError, CheckpointError) as err:
        print(f"hubtune: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ValueError) else EXIT_FAILED
    return result if isinstance(result, int) else 0


def _train(args: argparse.Namespace) -> int:
    from hubtune.config import from_args
    from hubtune.train import train

    return run_guarded(lambda: train(from_args(args)) and 0)


def _summary(args: argparse.Namespace) -> int:
    def run() -> int:
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
            print(f"  {group:<10} {name:<40} {type(module).__name__:<20} {n:>10,} {trainable}")
        with torch.no_grad():
            feats = net.forward_features(torch.zeros(1, *size))
        print(f"\nfeature map for one {tuple(size)} image: {tuple(feats.shape)}")
        return 0

    return run_guarded(run)


def _checkpoints(args: argparse.Namespace) -> int:
    def run() -> int:
        import json
        from pathlib import Path

        from hubtune import checkpoint

        root = Path(args.output_dir)
        found = checkpoint.listing(root)
        if not found:
            print(f"no checkpoints in {root / checkpoint.CHECKPOINTS}")
            return 0
        latest = checkpoint.find_resume(root, "latest") if found else None
        rows = []
        for path in found:
            try:
                checkpoint.verify(path)
                state = json.loads((path / checkpoint.STATE_FILE).read_text())
                run_state, metric = state["run_state"], state["config"]["metric"]
                best = run_state["best"]
                where = "in epoch" if run_state["in_epoch"] else "end of epoch"
                epoch = run_state["epoch"] + (1 if run_state["in_epoch"] else 0)
                last = run_state["history"][-1] if run_state["history"] else {}
                shown = f"{metric} {last[metric]:.4f}" if last and not run_state["in_epoch"] else "-"
                marks = [m for m, on in (("best", best.get("checkpoint") == path.name), ("latest", path == latest)) if on]
                rows.append((path.name, str(run_state["global_step"]), f"{where} {epoch}", shown,
                             f"{checkpoint.dir_size(path) / 2**20:.1f} MiB", ",".join(marks)))
            except (checkpoint.CheckpointError, KeyError, ValueError) as err:
                rows.append((path.name, "-", "-", "-", f"{checkpoint.dir_size(path) / 2**20:.1f} MiB", f"DAMAGED: {err}"))
        header = ("checkpoint", "step", "position", "metric", "size", "")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0

    return run_guarded(run)


def _hub_serve(args: argparse.Namespace) -> int:
    from hubtune.hub_server import run_serve

    return run_guarded(lambda: run_serve(args))


def build_parser() -> argparse.ArgumentParser:
    from hubtune import __version__
    from hubtune.config import add_arguments

    parser = argparse.ArgumentParser(prog="hubtune", description="Fine-tune timm image classifiers on the Hub.")
    parser.add_argument("--version", action="version", version=f"hubtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model (same flags as `accelerate launch hubtune/train.py`)")
    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("summary", help="parameter table per group and a layer summary for a model and freeze spec")
    p.add_argument("model", help="timm architecture, Hub id or local-dir:PATH")
    p.add_argument("--freeze", default="", help="freeze spec, as for `hubtune train --freeze`")
    p.add_argument("--freeze-bn", action="store_true", help="also fix BatchNorm statistics in frozen parts")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="load pretrained weights (default: no, the table does not need them)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("checkpoints", help="list the checkpoints of a run: step, epoch, metric, size, best and latest")
    p.add_argument("output_dir", help="the run's --output-dir")
    p.set_defaults(func=_checkpoints)

    hub = sub.add_parser("hub", help="local Hub-compatible server").add_subparsers(dest="hub_command", required=True)
    p = hub.add_parser("serve", help="serve a Hub-compatible API from a directory (for offline use and tests)")
    try:
        from hubtune.hub_server import add_serve_arguments

        add_serve_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_hub_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
