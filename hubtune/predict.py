"""`hubtune predict`: classify files and whole directories, decoded in loader workers and batched.

An image that cannot be read is a row with an error in the output, not the end of the run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from hubtune.errors import ConfigError
from hubtune.files import atomic_write, unwritable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
OUTPUT_FORMATS = (".csv", ".jsonl")


def image_files(paths: list[str]) -> list[Path]:
    """The files to classify: files as given, directories walked (image suffixes only), in a stable order.

    Raises:
        ConfigError: a path does not exist, or a directory holds no image file.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ConfigError(f"{raw}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{raw}: no such file or directory")
    return found


class _Images:
    """A map-style dataset of (index, transformed image or None, error) for a DataLoader's workers."""

    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from hubtune.data import ImageTooLarge, decode, read_image_file

        try:
            with self.files[i].open("rb") as f:
                data = read_image_file(f)
        except ImageTooLarge as err:
            return i, None, str(err)
        except OSError as err:
            return i, None, f"cannot read the file ({err.strerror or err})"
        img = decode(data)
        return (i, self.transform(img), None) if img is not None else (i, None, "not a readable image")


def _collate(items: list[tuple[int, Any, str | None]]) -> list[tuple[int, Any, str | None]]:
    return items


def predictions(classifier: Any, files: list[Path], top_k: int, batch_size: int,
                num_workers: int, tta: bool = False) -> Iterator[dict[str, Any]]:
    """{"image", "predictions"} or {"image", "error"} per file, in the order of `files` (`tta`: see
    `ImageClassifier.logits`; the model's temperature, if any, is applied)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    # DataLoader takes any map-style dataset (__len__, __getitem__), but its hint names torch's Dataset, which _Images
    # does not subclass: the CLI imports this module for `hubtune predict`'s flags, which must not wait for torch
    images = cast("Dataset[tuple[int, Any, str | None]]", _Images(files, classifier.transform))
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        good = [(i, x) for i, x, _ in batch if x is not None]
        preds = dict(zip((i for i, _ in good), classifier.classify(torch.stack([x for _, x in good]), top_k, tta))) \
            if good else {}
        for i, _, error in batch:
            row = {"image": str(files[i])}
            row.update({"predictions": preds[i]} if error is None else {"error": error})
            yield row


def write_rows(rows: list[dict[str, Any]], output: Path | None, as_json: bool) -> None:
    """Text lines (or one JSON list) on stdout, or a .csv/.jsonl file."""
    if output is None:
        if as_json:
            print(json.dumps(rows, indent=2))
        for row in [] if as_json else rows:
            for p in row.get("predictions", []):
                print(f"{row['image']}: {p['label']} ({p['score']:.4f})")
            if "error" in row:
                print(f"{row['image']}: error: {row['error']}")
        return
    text = io.StringIO()
    if output.suffix == ".jsonl":
        text.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        top_k = max((len(row.get("predictions", [])) for row in rows), default=1)
        writer = csv.writer(text)
        writer.writerow(["image", *(f"{name}_{k}" for k in range(1, top_k + 1) for name in ("label", "score")),
                         "error"])
        for row in rows:
            cells = [c for p in row.get("predictions", []) for c in (p["label"], f"{p['score']:.6f}")]
            writer.writerow([row["image"], *cells, *[""] * (2 * top_k - len(cells)), row.get("error", "")])
    try:
        atomic_write(output, text.getvalue(), fsync=False)
    except OSError as err:
        raise ConfigError(f"--output {str(output)!r} cannot be written ({err.strerror or err}); give a writable "
                          "file path") from err


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hubtune predict` arguments."""
    parser.add_argument("source", help="model directory (config.json + model.safetensors) or Hub repo id org/name")
    parser.add_argument("images", nargs="+", help="image files and directories (walked for image files)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="predictions to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text lines")
    parser.add_argument("--output", default=None, metavar="FILE.csv|FILE.jsonl",
                        help="write the predictions to a .csv or .jsonl file instead of stdout")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit sha (default: the main branch)")
    parser.add_argument("--trust-pickled-weights", action="store_true",
                        help="allow pickled weights (pytorch_model.bin, *.pth) when there is no model.safetensors; "
                             "they can run code, so only for sources you trust")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes that decode images")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the logits of each image and its mirror image (flipped "
                             "left to right), as timm's --tta averages its copies")


def run_predict(args: argparse.Namespace) -> int:
    """Classify `args.images` with `args.source`; print (or write) the predictions; unreadable files are rows too."""
    from hubtune.classifier import ImageClassifier

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {args.output!r}: expected a file ending in {' or '.join(OUTPUT_FORMATS)}")
    if output is not None:
        problem = unwritable(output, directory=False)
        if problem:
            raise ConfigError(f"--output {args.output!r} cannot be written: {problem}; give a writable file path")
    for name, least in (("top_k", 1), ("batch_size", 1), ("num_workers", 0)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected an integer >= {least}")
    files = image_files(args.images)
    logging.getLogger("timm").setLevel(logging.WARNING)  # its per-load INFO lines would drown the predictions
    classifier = ImageClassifier.from_pretrained(args.source, args.revision,
                                                 trust_pickled_weights=args.trust_pickled_weights)
    rows = list(predictions(classifier, files, args.top_k, args.batch_size, args.num_workers, args.tta))
    write_rows(rows, output, args.json)
    failed = sum("error" in row for row in rows)
    if failed:
        print(f"hubtune predict: {failed} of {len(rows)} images could not be read (see their rows)", file=sys.stderr)
    if output is not None:
        print(f"wrote {len(rows)} rows to {output}", file=sys.stderr)
    return 0
