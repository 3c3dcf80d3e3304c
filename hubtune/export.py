"""`hubtune export`: a trained classifier as an ONNX graph for deployment, checked against PyTorch before it is kept.

The graph takes the normalized NCHW float32 batch and returns the logits; the preprocessing stays out of it and is
written beside it in preprocessing.json (the numbers of the model's timm data config, its labels, the graph's input
and output names). Before anything is written, onnxruntime runs the graph on a batch of the model's own
eval-transformed images (given with --images, else synthetic) at two batch sizes and is compared with PyTorch: above
--tolerance the export is refused. `--push` adds the files under onnx/ of the model repo, with an ONNX usage section
in its card, in one verified commit.

onnx, onnxruntime and onnxscript (which torch's exporter needs) are the optional extra `hubtune[export]`. They,
torch and timm are imported inside the functions: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.errors import ConfigError, ExportError
from hubtune.files import CARD_FILE, TMP_PREFIX

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hubtune.classifier import ImageClassifier

EXTRA = ("onnx", "onnxruntime", "onnxscript")
REPO_DIR = "onnx"  # where the files go in the model repo
ONNX_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"  # the weights of a model over 2 GB, beside the graph
INT8_FILE = "model_int8.onnx"
PREPROCESSING_FILE = "preprocessing.json"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
TOLERANCE = 1e-4
MIN_OPSET = 18  # the lowest opset torch's dynamo exporter writes; below it, it silently writes 18
PARITY_IMAGES = 8
SECTION = re.compile(r"<!-- hubtune-onnx.*?<!-- /hubtune-onnx -->\n?", re.DOTALL)


@dataclass
class Parity:
    """How the ONNX logits compare with a reference (PyTorch's, or the fp32 graph's for int8)."""

    images: int
    batch_sizes: list[int]
    max_abs_diff: float
    top1_agreement: float

    def describe(self) -> str:
        return (f"max abs logit difference {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.1%} "
                f"({self.images} images, batch sizes {', '.join(map(str, self.batch_sizes))})")


def require_extra() -> None:
    """Raises ExportError naming the extra when onnx, onnxruntime or onnxscript cannot be imported."""
    import importlib

    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"hubtune export needs {' and '.join(missing)} (not importable here): "
                          "pip install 'hubtune[export]'")


def parity_batch(clf: ImageClassifier, images: list[str] | None, count: int) -> torch.Tensor:
    """Up to `count` images (the first of `images`, else synthetic ones) through the model's eval transform."""
    import numpy as np
    import torch
    from PIL import Image

    from hubtune.data import decode
    from hubtune.predict import image_files

    if images:
        decoded = [decode(p.read_bytes()) for p in image_files(images)[:count]]
        pictures = [img for img in decoded if img is not None]
        if not pictures:
            raise ConfigError(f"--images {' '.join(images)}: none of the first {count} files is a readable image")
    else:  # varied sizes and aspect ratios, so resizing and cropping are exercised too
        rng = np.random.default_rng(0)
        pictures = []
        for i in range(count):
            h, w = 24 + 12 * (i % 4), 24 + 9 * ((i + 1) % 5)
            ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, 3)
            pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            pictures.append(Image.fromarray(pixels, "RGB"))
    return torch.stack([clf.transform(img) for img in pictures])


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool) -> int:
    """Export with torch's dynamo exporter (torch.export based, the one torch recommends); returns the opset."""
    import torch

    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opset, dynamic_shapes=shapes,
                                    verbose=False)
    except torch.onnx.OnnxExporterError as err:
        hint = "; try --static" if dynamic_batch else ""
        raise ExportError(f"torch {torch.__version__} cannot export this model to ONNX: "
                          f"{str(err).strip().splitlines()[0]}{hint}") from err
    if program is None:  # only the legacy (dynamo=False) exporter returns nothing
        raise ExportError(f"torch {torch.__version__}'s ONNX exporter returned no program for this model")
    program.save(path)  # weights inside the file, or beside it (external data) above 2 GB
    written = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise ExportError(f"--opset {opset}: torch {torch.__version__} wrote opset {written} instead; give another "
                          "--opset or leave it out for the exporter's default")
    return written


def run_onnx(path: Path, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The graph's logits for `batch` with onnxruntime on the CPU, `batch_size` images per call."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's business
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: batch[i:i + batch_size]})[0]
                               for i in range(0, len(batch), batch_size)])
    except Exception as err:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, NotImplemented...)
        raise ExportError(f"onnxruntime {ort.__version__} cannot run {path.name}: "
                          f"{str(err).strip().splitlines()[0]}") from err


def compare(reference: np.ndarray, runs: dict[int, np.ndarray]) -> Parity:
    """The worst difference and top-1 agreement of the logits of every batch size with `reference`."""
    import numpy as np

    diffs = [float(np.abs(got - reference).max()) for got in runs.values()]
    agree = [float((got.argmax(1) == reference.argmax(1)).mean()) for got in runs.values()]
    finite = all(np.isfinite(got).all() for got in runs.values())
    return Parity(len(reference), list(runs), max(diffs) if finite else float("inf"), min(agree))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization (weights int8, activations quantized at run time), after ORT's pre-processing."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = target.with_name(f".pre-{target.name}")
    quant_pre_process(str(source), str(prepared))
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    prepared.unlink()


def export_onnx(clf: ImageClassifier, output_dir: Path, *, opset: int | None = None, dynamic_batch: bool = True,
                tolerance: float = TOLERANCE, quantize: str | None = None, images: list[str] | None = None,
                num_images: int = PARITY_IMAGES) -> dict[str, Any]:
    """Export `clf` to ONNX, check it against PyTorch, and only then move model.onnx, preprocessing.json (and
    model_int8.onnx) into `output_dir`; returns the record written to preprocessing.json.

    Raises:
        ExportError: torch cannot export the model, onnxruntime cannot run it, or the logits differ from PyTorch's
            by more than `tolerance` (nothing is written then).
    """
    import torch

    from hubtune.version import __version__

    batch = parity_batch(clf, images, num_images)
    with torch.inference_mode():
        reference = clf.model(batch).float().numpy()
    pixels = batch.numpy()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{output_dir.name}-", dir=output_dir.parent))
    try:
        example = batch[:2] if dynamic_batch and len(batch) > 1 else batch[:1]  # a batch of 1 would fix the size
        written_opset = to_onnx(clf.model, example, work / ONNX_FILE, opset, dynamic_batch)
        sizes = [len(batch), 1] if dynamic_batch and len(batch) > 1 else [1]
        fp32 = {size: run_onnx(work / ONNX_FILE, pixels, size) for size in sizes}
        parity = compare(reference, fp32)
        if not parity.max_abs_diff <= tolerance:
            raise ExportError(f"ONNX parity check failed: {parity.describe()} against PyTorch, above --tolerance "
                              f"{tolerance:g}; nothing was written")
        int8 = None
        if quantize == "int8":
            quantize_int8(work / ONNX_FILE, work / INT8_FILE)
            int8 = compare(fp32[sizes[0]], {size: run_onnx(work / INT8_FILE, pixels, size) for size in sizes})
        record = {
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "input": "NCHW float32 RGB: pixels / 255, then (x - mean) / std per channel",
            **{key: _plain(clf.data_config[key]) for key in PREPROCESSING_KEYS if key in clf.data_config},
            "label_names": clf.label_names, "batch_size": "dynamic" if dynamic_batch else 1,
            "export": {"source": clf.source, "revision": clf.revision, "opset": written_opset,
                       "torch": torch.__version__, "hubtune": __version__, "tolerance": tolerance,
                       "parity": asdict(parity), "int8": {"file": INT8_FILE, **asdict(int8)} if int8 else None},
        }
        (work / PREPROCESSING_FILE).write_text(json.dumps(record, indent=2) + "\n")
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in (INT8_FILE, EXTERNAL_DATA):  # of an earlier export, not of this model.onnx
            if not (work / name).exists():
                (output_dir / name).unlink(missing_ok=True)
        for item in sorted(work.iterdir()):
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def card_with_section(card: str | None, section: str, repo_id: str) -> str:
    """`card` with the ONNX section in place of an earlier one, else before "## How to reproduce", else at its end;
    the rest of its text is kept. A card hubtune generated and nobody edited stays marked as hubtune's."""
    from hubtune.hub import CARD_MARKER, card_was_edited, mark_card

    text = card if card is not None else f"---\nlibrary_name: timm\n---\n# {repo_id}\n"
    ours = card is not None and CARD_MARKER in card and not card_was_edited(card)
    if SECTION.search(text):
        text = SECTION.sub(lambda _: section, text, count=1)
    elif "\n## How to reproduce" in text:
        text = text.replace("\n## How to reproduce", f"\n{section}\n## How to reproduce", 1)
    else:
        body, marker, rest = text.partition(CARD_MARKER)
        text = f"{body.rstrip()}\n\n{section}" + (f"\n{marker}{rest}" if marker else "")
    return mark_card(text.split(CARD_MARKER)[0]) if ours else text


def push_export(output_dir: Path, record: dict[str, Any], repo_id: str, branch: str | None) -> str:
    """Add the export under onnx/ of `repo_id` and its usage section to the card, in one verified commit.

    Raises:
        PushError: the Hub refused or could not be reached; the local export is kept, run the same command again.
    """
    from huggingface_hub.errors import EntryNotFoundError

    from hubtune import card, hub

    info = record["export"]
    files = [ONNX_FILE, PREPROCESSING_FILE] + [INT8_FILE] * bool(info["int8"])
    files += [EXTERNAL_DATA] * (output_dir / EXTERNAL_DATA).is_file()
    usage = {**info, "file": f"{REPO_DIR}/{ONNX_FILE}", "preprocessing": f"{REPO_DIR}/{PREPROCESSING_FILE}",
             "int8": info["int8"] and {**info["int8"], "file": f"{REPO_DIR}/{INT8_FILE}"},
             "dynamic_batch": record["batch_size"] == "dynamic"}
    client = hub.api()
    with hub.push_errors(repo_id, "reading the card"):
        try:
            remote = Path(client.hf_hub_download(repo_id, CARD_FILE, revision=branch)).read_text(encoding="utf-8")
        except EntryNotFoundError:
            remote = None
        stale = [f for f in client.list_repo_files(repo_id, revision=branch)  # of an earlier export
                 if f in {f"{REPO_DIR}/{name}" for name in (INT8_FILE, EXTERNAL_DATA) if name not in files}]
    section = card.render_onnx_usage(repo_id, usage, min(card.TOP_K, len(record["label_names"])))
    contents: dict[str, bytes | Path] = {f"{REPO_DIR}/{name}": output_dir / name for name in files}
    contents[CARD_FILE] = card_with_section(remote, section, repo_id).encode()
    message = f"hubtune export: ONNX (opset {info['opset']}) of {(info['revision'] or '')[:8]}"
    target = hub.PushTarget(repo_id, revision=branch, commit_message=message, overwrite_card=True)  # section merged
    return hub.push_files(target, contents, deletions=stale, folder=output_dir)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hubtune export` arguments."""
    parser.add_argument("model", help="a trained model: Hub repo (org/name[@branch]) or local export directory")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--output-dir", default="onnx", help="where model.onnx and preprocessing.json go "
                                                             "(default: ./onnx)")
    parser.add_argument("--revision", default=None, help="model revision on the Hub (default: main)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {MIN_OPSET} or above (default: the exporter's)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=True,
                       help="a graph that takes any batch size (default)")
    batch.add_argument("--static", dest="dynamic_batch", action="store_false",
                       help="a graph of batch size 1, all shapes fixed")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write model_int8.onnx (dynamic int8 quantization) and report its agreement")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest max abs logit difference from PyTorch accepted (default: {TOLERANCE:g})")
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH",
                        help="image files or directories for the parity check (default: synthetic images)")
    parser.add_argument("--num-images", type=int, default=PARITY_IMAGES,
                        help=f"images in the parity check (default: {PARITY_IMAGES})")
    parser.add_argument("--push", action="store_true",
                        help="add onnx/ and an ONNX usage section of the card to the model repo, in one verified "
                             "commit")
    parser.add_argument("--trust-pickled-weights", action="store_true",
                        help="allow pickled weights when there is no model.safetensors (only for trusted sources)")


def run_export(args: argparse.Namespace) -> int:
    """Export args.model, print the parity numbers, and push when asked."""
    from hubtune.sources import is_commit, parse_model_spec

    problems = []
    if args.opset is not None and args.opset < MIN_OPSET:
        problems.append(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or above")
    if not args.tolerance >= 0:
        problems.append(f"--tolerance {args.tolerance}: expected a number >= 0")
    if args.num_images < 1:
        problems.append(f"--num-images {args.num_images}: expected an integer >= 1")
    spec = parse_model_spec(args.model, args.revision)
    if args.push and spec.kind != "hub":
        problems.append(f"--push adds the export to a Hub model repo; {args.model!r} is not one (push the model "
                        "with `hubtune push` first, then export it from the Hub)")
    if args.push and is_commit(spec.revision):
        problems.append(f"--push needs a branch to add the export to, not the commit {spec.revision!r}: give "
                        f"{spec.repo_id} or {spec.repo_id}@BRANCH")
    if problems:
        raise ConfigError("; ".join(problems))
    require_extra()
    from hubtune.classifier import ImageClassifier

    logging.getLogger("timm").setLevel(logging.WARNING)
    clf = ImageClassifier.from_pretrained(args.model, args.revision, device="cpu", dtype="float32",
                                          trust_pickled_weights=args.trust_pickled_weights)
    out = Path(args.output_dir)
    record = export_onnx(clf, out, opset=args.opset, dynamic_batch=args.dynamic_batch, tolerance=args.tolerance,
                         quantize=args.quantize, images=args.images, num_images=args.num_images)
    info = record["export"]
    where = f"{clf.source}@{clf.revision[:12]}" if clf.revision else clf.source
    shape = "dynamic batch" if args.dynamic_batch else "batch size 1"
    print(f"exported {where} to ONNX (opset {info['opset']}, {shape})")
    print(f"parity vs PyTorch: {Parity(**info['parity']).describe()}; tolerance {args.tolerance:g}")
    if info["int8"]:
        int8 = Parity(**{k: v for k, v in info["int8"].items() if k != "file"})
        print(f"int8 vs fp32: {int8.describe()}; top-1 agreement drop {1 - int8.top1_agreement:.1%}, "
              f"{(out / INT8_FILE).stat().st_size / 2**20:.1f} MiB vs {(out / ONNX_FILE).stat().st_size / 2**20:.1f} "
              "MiB")
    written = [str(out / name) for name in (ONNX_FILE, INT8_FILE, PREPROCESSING_FILE) if (out / name).is_file()]
    print(f"wrote {', '.join(written)}")
    if args.push:
        print(push_export(out, record, spec.hub_repo_id, spec.revision))
    return 0
