"""The bodies of the `hubtune` subcommands that print: `push`, `prefetch`, `summary`, `checkpoints`.

cli.py holds the table of subcommands; the library functions these call take typed arguments and print nothing.
torch, timm and huggingface_hub are imported inside the functions: the CLI imports this module to build its parser,
and huggingface_hub reads HF_ENDPOINT once, when it is first imported.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hubtune.errors import CheckpointError, ConfigError
from hubtune.files import CHECKPOINTS_DIR


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a finished run's --output-dir")
    parser.add_argument("repo_id", help="Hub repo to push to (user/name)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--push-checkpoints", action="store_true", help="also push checkpoints/ (optimizer state)")
    parser.add_argument("--overwrite-card", action="store_true", help="replace a README.md edited on the Hub")
    parser.add_argument("--retries", type=int, default=4, help="retries of transient failures (default: 4)")


def run_push(args: argparse.Namespace) -> int:
    from hubtune import hub

    target = hub.PushTarget(args.repo_id, revision=args.revision, private=args.private,
                            commit_message=args.commit_message, overwrite_card=args.overwrite_card,
                            retries=args.retries)
    print(hub.push(args.output_dir, target, push_checkpoints=args.push_checkpoints))
    return 0


def add_prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model (Hub id or timm architecture)")
    parser.add_argument("--dataset", default=None, help="Hub dataset id")
    parser.add_argument("--dataset-revision", default=None, help="dataset branch, tag or commit")


def run_prefetch(args: argparse.Namespace) -> int:
    from hubtune import hub

    if not args.model and not args.dataset:
        raise ConfigError("prefetch needs --model and/or --dataset")
    for kind, path in hub.prefetch(args.model, args.dataset, args.dataset_revision).items():
        print(f"{kind}: {path}")
    print("cached; on nodes without internet run with HF_HUB_OFFLINE=1")
    return 0


def summary(args: argparse.Namespace) -> int:
    """`hubtune summary`: the parameter table per group, the layers, the feature map and the unfreezing schedule."""
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
        schedule = unfreeze.resolve_schedule(net, cfg.unfreeze_schedule, cfg.freeze, frozen)
        epochs = args.epochs or max(epoch for epoch, _, _ in schedule)
        print("\nschedule (--unfreeze-at):")
        print("\n".join("  " + line for line in unfreeze.describe(net, schedule, frozen, epochs)))
    return 0


def checkpoints(args: argparse.Namespace) -> int:
    """`hubtune checkpoints OUTPUT_DIR|REPO[@BRANCH]`: one line per checkpoint, local or on the Hub."""
    from hubtune.sources import is_hub_id

    if not is_hub_id(args.source):
        root = Path(args.source)
        rows, where = local_checkpoint_rows(root), str(root / CHECKPOINTS_DIR)
    else:
        from hubtune import hub_checkpoints
        from hubtune.sources import repo_id_problem, revision_problem

        repo_id, _, branch = args.source.partition("@")
        problem = repo_id_problem(repo_id) or revision_problem(branch or args.branch)
        if problem:
            raise ConfigError(f"{args.source!r}: {problem}; expected OUTPUT_DIR or REPO[@BRANCH]")
        rows = hub_checkpoints.describe_remote(repo_id, branch or args.branch)
        where = f"{repo_id}@{branch or args.branch}/{CHECKPOINTS_DIR}"
    if not rows:
        print(f"no checkpoints in {where}")
        return 0
    print(format_rows(("checkpoint", "step", "position", "metric", "size", ""), rows))
    return 0


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A header and rows as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def local_checkpoint_rows(root: Path) -> list[tuple[str, ...]]:
    """One row per checkpoint of a run (name, step, position, metric, size, marks), for `hubtune checkpoints`."""
    from hubtune import checkpoint
    from hubtune.records import best_from_json

    found = checkpoint.listing(root)
    latest = checkpoint.newest_usable(root) if found else None
    rows: list[tuple[str, ...]] = []
    for path in found:
        size = f"{checkpoint.dir_size(path) / 2**20:.1f} MiB"
        try:
            checkpoint.verify(path)
            state = checkpoint.read_state(path)
            best = best_from_json(state["run_state"]["best"])
            marks = [m for m, on in (("best", best is not None and best.checkpoint == path.name),
                                     ("latest", path == latest)) if on]
            rows.append((path.name, *checkpoint.state_columns(state), size, ",".join(marks)))
        except (CheckpointError, KeyError, ValueError, TypeError, AttributeError) as err:  # fields of another shape
            rows.append((path.name, "-", "-", "-", size, f"DAMAGED: {err}"))
    return rows
