"""`hubtune export`: ONNX graphs checked against PyTorch, preprocessing beside them, pushed with a card snippet that
runs.

Models are random-init timm classifiers saved by hubtune's own export (config.json + model.safetensors); the Hub is
the local one, reached through the real huggingface_hub client; the graphs run in the real onnxruntime.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from helpers import make_rgb
from huggingface_hub import HfApi, hf_hub_download

from hubtune import ImageClassifier
from hubtune import hub as hub_lib
from hubtune import model as model_lib
from hubtune.card import write_card
from hubtune.cli import build_parser
from hubtune.errors import run_guarded
from hubtune.export import SECTION
from hubtune.hub import CARD_MARKER

REPO = Path(__file__).resolve().parents[1]
RUN = Path(__file__).parent / "fixtures" / "cards" / "run"  # a finished run's metrics.json and train_config.yaml
LABELS = ["daisy", "rose", "tulip"]  # that run's classes
TOKEN = "tok-alice-write"
PREPROCESSING = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
# a real timm architecture with depthwise convolutions and squeeze-and-excitation, and timm's tiny test model
ARCHITECTURES = [("test_resnet", 32), ("mobilenetv3_small_050", 64)]


def make_model_dir(folder: Path, arch: str, size: int, repo_id: str | None = None) -> Path:
    """A model exported as `hubtune train` exports it; with `repo_id`, a whole run's output dir with its card."""
    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=len(LABELS)).eval()
    data_cfg = model_lib.data_config(net, size)
    transform = timm.data.create_transform(**data_cfg)
    rng = random.Random(1)
    with torch.no_grad():  # spread and centre the logits on such images, so they get different top-1 labels
        net.get_classifier().weight.normal_(0, 3)
        net.get_classifier().bias -= net(torch.stack([transform(make_rgb(i % 2, rng)) for i in range(8)])).mean(0)
    model_lib.export(net, folder, LABELS, data_cfg)
    if repo_id is not None:  # to be pushed: the run's record and the card `hubtune train` writes
        for name in ("metrics.json", "train_config.yaml"):
            shutil.copy(RUN / name, folder / name)
        write_card(folder, repo_id=repo_id)
    return folder


def export(*argv: str) -> int:
    """`hubtune export ...` in this process: the CLI's parser and error handling (its main() would also rewire the
    process's stdout, stderr and logging, which pytest owns here)."""
    def dispatch() -> int:
        args = build_parser(["export", *argv]).parse_args(["export", *argv])
        return args.func(args)

    return run_guarded(dispatch)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def images(folder: Path, count: int) -> list[Path]:
    """Photos of odd sizes, so resizing and cropping matter."""
    folder.mkdir(exist_ok=True)
    rng = random.Random(3)
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i}.jpg")
        make_rgb(i % 2, rng, size=48).resize((48 + 7 * i, 40 + 3 * i)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("resnet"), "test_resnet", 32)


@pytest.mark.slow
def test_export_writes_a_graph_and_preprocessing_that_match_pytorch_at_two_batch_sizes(resnet_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert export(str(resnet_dir), "--output-dir", str(out), "--quantize", "int8") == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model_int8.onnx", "preprocessing.json"]

    prep = json.loads((out / "preprocessing.json").read_text())
    pretrained_cfg = json.loads((resnet_dir / "config.json").read_text())["pretrained_cfg"]
    assert {key: prep[key] for key in PREPROCESSING} == {key: pretrained_cfg[key] for key in PREPROCESSING}
    assert prep["input_size"] == [3, 32, 32] and prep["label_names"] == LABELS and prep["batch_size"] == "dynamic"

    graph = session(out / "model.onnx")
    assert [(i.name, i.shape) for i in graph.get_inputs()] == [(prep["input_name"], ["batch", 3, 32, 32])]
    clf = ImageClassifier.from_pretrained(resnet_dir, device="cpu")
    from PIL import Image

    pixels = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in images(tmp_path / "img", 5)])
    with torch.no_grad():
        expected = clf.model(pixels).numpy()
    for batch in (5, 1):
        got = np.concatenate([graph.run(None, {"pixel_values": pixels[i:i + batch].numpy()})[0]
                              for i in range(0, 5, batch)])
        assert np.abs(got - expected).max() < 1e-4
    assert len(set(expected.argmax(1))) > 1  # the images are told apart, so agreement means something

    parity = prep["export"]["parity"]
    assert parity["images"] == 8 and parity["batch_sizes"] == [8, 1] and parity["top1_agreement"] == 1.0
    line = re.search(r"parity vs PyTorch: max abs logit difference (\S+), top-1 agreement 100.0% \(8 images, batch "
                     r"sizes 8, 1\); tolerance 0.0001", stdout)
    assert line and float(line[1]) == pytest.approx(parity["max_abs_diff"], rel=0.01) and parity["max_abs_diff"] < 1e-4

    int8 = prep["export"]["int8"]
    ops = {node.op_type for node in onnx.load(out / "model_int8.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger"} <= ops  # really quantized
    fp32 = graph.run(None, {"pixel_values": pixels.numpy()})[0]
    quantized = session(out / "model_int8.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
    assert 0 < np.abs(quantized - fp32).max() < np.abs(fp32).max() / 4 and 0.5 <= int8["top1_agreement"] <= 1.0
    assert f"int8 vs fp32: max abs logit difference {int8['max_abs_diff']:.2e}" in stdout
    assert "top-1 agreement drop" in stdout


@pytest.mark.slow
def test_static_export_takes_one_image_at_a_time_and_checks_given_images(resnet_dir, tmp_path, capsys):
    photos = images(tmp_path / "photos", 4)
    out = tmp_path / "static"
    assert export(str(resnet_dir), "--output-dir", str(out), "--static", "--images", str(photos[0].parent),
                  "--num-images", "3") == 0
    assert [i.shape for i in session(out / "model.onnx").get_inputs()] == [[1, 3, 32, 32]]
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep["batch_size"] == 1 and prep["export"]["parity"]["images"] == 3
    assert prep["export"]["parity"]["batch_sizes"] == [1] and prep["export"]["int8"] is None
    assert f"(opset {prep['export']['opset']}, batch size 1)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_parity_check_refuses_the_export_and_writes_nothing(resnet_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    # ONNX Runtime's kernels differ from PyTorch's by ~1e-7 here, more than a tolerance of 0
    assert export(str(resnet_dir), "--output-dir", str(out), "--tolerance", "0") == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"hubtune: error: ONNX parity check failed: max abs logit difference \S+, top-1 agreement "
                        r"100\.0% \(8 images, batch sizes 8, 1\) against PyTorch, above --tolerance 0; nothing was "
                        r"written\n", err), err
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def _card(repo_id: str) -> str:
    return Path(hf_hub_download(repo_id, "README.md")).read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", ARCHITECTURES)
def test_push_adds_onnx_in_one_verified_commit_and_the_card_snippet_runs(hub, arch, size, tmp_path, monkeypatch):
    repo_id = f"alice/onnx-{uuid.uuid4().hex[:8]}"
    hub_lib.push(make_model_dir(tmp_path / "run", arch, size, repo_id), hub_lib.PushTarget(repo_id, token=TOKEN))
    api = HfApi(token=TOKEN)
    before, commits = _card(repo_id), len(api.list_repo_commits(repo_id))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert export(repo_id, "--output-dir", str(tmp_path / "onnx"), "--push") == 0

    assert len(api.list_repo_commits(repo_id)) == commits + 1
    files = set(api.list_repo_files(repo_id))
    assert {"onnx/model.onnx", "onnx/preprocessing.json"} <= files and "onnx/model_int8.onnx" not in files
    for name in ("model.onnx", "preprocessing.json"):  # the verified commit holds exactly the local files
        assert Path(hf_hub_download(repo_id, f"onnx/{name}")).read_bytes() == (tmp_path / "onnx" / name).read_bytes()
    after = _card(repo_id)
    sections = SECTION.findall(after)
    assert len(sections) == 1  # between "How to use" and "How to reproduce", the rest of the text kept
    assert after.replace(sections[0] + "\n", "").split(CARD_MARKER)[0] == before.split(CARD_MARKER)[0]
    assert after.index(sections[0]) < after.index("## How to reproduce")
    assert not hub_lib.card_was_edited(after)  # still hubtune's card: a later `hubtune push` may regenerate it

    snippet = re.search(r"```python\n(.*?)```", sections[0], re.DOTALL)[1]
    (tmp_path / "snippet.py").write_text(snippet)
    image = tmp_path / "cat.jpg"
    make_rgb(0, random.Random(5)).resize((61, 45)).save(image)
    # as a deployment would run it: torch and timm cannot be imported
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = sys.modules['timm'] = None; "
                           "exec(open('snippet.py').read())"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_TOKEN": TOKEN}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = ast.literal_eval(proc.stdout.strip())
    expected = ImageClassifier.from_pretrained(repo_id, device="cpu").predict(str(image), top_k=2)[0]
    assert [label for label, _ in got] == [p["label"] for p in expected]
    assert [score for _, score in got] == pytest.approx([p["score"] for p in expected], abs=2e-4)


@pytest.mark.slow
def test_a_second_export_replaces_the_section_keeps_human_edits_and_removes_a_stale_int8(hub, tmp_path, monkeypatch):
    repo_id = f"alice/onnx-again-{uuid.uuid4().hex[:8]}"
    hub_lib.push(make_model_dir(tmp_path / "run", "test_resnet", 32, repo_id), hub_lib.PushTarget(repo_id, token=TOKEN))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert export(repo_id, "--output-dir", str(tmp_path / "onnx"), "--push", "--quantize", "int8") == 0
    api = HfApi(token=TOKEN)
    assert "onnx/model_int8.onnx" in api.list_repo_files(repo_id)
    edited = _card(repo_id).replace("## Limitations", "## Limitations\n\nA note by a person.\n")
    api.upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=repo_id)

    assert export(repo_id, "--output-dir", str(tmp_path / "onnx"), "--push", "--static") == 0
    after = _card(repo_id)
    assert len(SECTION.findall(after)) == 1 and "batch size 1" in SECTION.findall(after)[0]
    assert SECTION.sub("", after) == SECTION.sub("", edited) and "A note by a person." in after  # marker included
    assert hub_lib.card_was_edited(after)  # a person's edit stays theirs: `hubtune push` keeps this card
    assert "onnx/model_int8.onnx" not in api.list_repo_files(repo_id)  # it belonged to the previous graph
    assert not (tmp_path / "onnx" / "model_int8.onnx").exists()


@pytest.mark.slow
def test_missing_extra_is_a_one_line_error_naming_it(resnet_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['onnxruntime'] = None; from hubtune.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "export", str(resnet_dir), "--output-dir", str(tmp_path / "onnx")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "hubtune: error: hubtune export needs onnxruntime (not importable here): pip install " \
                          "'hubtune[export]'\n"
    assert not (tmp_path / "onnx").exists()


def test_bad_flags_are_one_line_errors_before_anything_is_loaded(resnet_dir, tmp_path, capsys):
    assert export("alice/some-model", "--opset", "17", "--tolerance", "-1", "--num-images", "0") == 2
    assert capsys.readouterr().err == (
        "hubtune: error: --opset 17: torch's ONNX exporter writes opset 18 or above; --tolerance -1.0: expected a "
        "number >= 0; --num-images 0: expected an integer >= 1\n")
    assert export(str(resnet_dir), "--push") == 2
    assert "--push adds the export to a Hub model repo; " in capsys.readouterr().err
    assert export(f"alice/some-model@{'a' * 40}", "--push") == 2
    assert "--push needs a branch to add the export to" in capsys.readouterr().err
    for bad, message in ((["--format", "torchscript"], "argument --format: invalid choice: 'torchscript'"),
                         (["--static", "--dynamic-batch"], "argument --dynamic-batch: not allowed with argument"),
                         (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'")):
        assert export(str(resnet_dir), *bad) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hubtune: error: {message}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        export("--help")
    usage = capsys.readouterr().out
    assert "usage: hubtune export" in usage and all(f in usage for f in ("--static", "--quantize {int8}", "--push"))
