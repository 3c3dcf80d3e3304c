"""The command lines users type: the same flags three ways, one-line errors, the summary table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HUBTUNE = [sys.executable, "-m", "hubtune.cli"]


def run(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


def flags(dataset, out, *extra):
    return ["--model", "test_resnet", "--no-pretrained", "--dataset", str(dataset), "--image-size", "32",
            "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--max-bad-fraction", "0.05",
            "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("entry", [
    [sys.executable, "-m", "hubtune.train"],
    HUBTUNE + ["train"],
    [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
     "--mixed_precision", "no", "--dynamo_backend", "no", "hubtune/train.py"],
], ids=["python-m", "hubtune-train", "accelerate-launch"])
@pytest.mark.slow
def test_same_flags_work_through_every_entry_point(entry, two_class_folder, tmp_path):
    proc = run(entry + flags(two_class_folder, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "train_config.yaml").is_file()


# README's command line, exactly: `-q` because accelerate 1.16's launcher otherwise repeats the child's stderr in a
# traceback of its own when the script fails
ENTRY_POINTS = {
    "accelerate-launch": [str(Path(sys.executable).with_name("accelerate")), "launch", "-q", "hubtune/train.py"],
    "python-m": [sys.executable, "-m", "hubtune.train"],
    "hubtune-train": HUBTUNE + ["train"],
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_turns_user_errors_into_one_line(entry, two_class_folder, tmp_path):
    """The same error path whichever way training is started (train.py run as a script once had its own copy
    of the error classes, so `except BadDataError` did not match and a traceback came out)."""
    cases = [
        (flags(two_class_folder, tmp_path / "bad", "--max-bad-fraction", "0"), 1, "could not be decoded, over --max-bad-fraction 0"),
        (flags(tmp_path / "no-such-dataset", tmp_path / "missing"), 2, "no such local file or directory"),
        (flags(two_class_folder, tmp_path / "flag", "--no-such-flag", "1"), 2, "unrecognized arguments: --no-such-flag"),
    ]
    for args, code, message in cases:
        proc = run(ENTRY_POINTS[entry] + args)
        # accelerate's launcher exits 1 for any failure of its script
        assert proc.returncode == (1 if entry == "accelerate-launch" else code), proc.stderr[-3000:]
        lines = [line.removeprefix("[RANK 0] ") for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("hubtune: error: ")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert lines[-1] == errors[0], proc.stderr[-3000:]  # the last thing the user sees
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("extra, message", [
    (["--mixed-precision", "fp8"], "invalid configuration: --mixed-precision: got 'fp8', expected one of no, bf16, fp16"),
    (["--label-column", "breed"], "--label-column 'breed' is not in the dataset; columns: image (Image), label (ClassLabel)"),
    (["--freeze", "stages.7"], "--freeze 'stages.7' matches no parameters"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_error_without_traceback(extra, message, two_class_folder, tmp_path):
    proc = run(HUBTUNE + ["train", *flags(two_class_folder, tmp_path / "out", *extra)])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("hubtune: error")]) == 1


@pytest.mark.slow
def test_unknown_model_is_named(two_class_folder, tmp_path):
    proc = run(HUBTUNE + ["train", *flags(two_class_folder, tmp_path / "o"), "--model", "resnet_nope"])
    assert proc.returncode == 2 and "--model 'resnet_nope' is not a timm architecture" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_summary_prints_group_table_and_layers():
    proc = run(HUBTUNE + ["summary", "test_resnet", "--freeze", "stem,stages.0-1", "--freeze-bn", "--image-size", "64"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["group", "total", "trainable", "frozen"])
    layer1 = next(line for line in lines[header:] if line.startswith("layer1"))
    _, total, trainable, frozen = layer1.split()
    assert trainable == "0" and frozen == total
    assert "BatchNorm2d (fixed)" in proc.stdout
    assert "input (3, 64, 64)" in proc.stdout


@pytest.mark.slow
def test_help_lists_every_command_from_one_table():
    proc = run(HUBTUNE + ["--help"])
    assert proc.returncode == 0
    for command in ("train", "summary", "checkpoints", "push", "prefetch", "predict", "card", "demo", "reproduce",
                    "hub"):
        assert f"    {command}" in proc.stdout, command
    for command in ("push", "predict", "card", "reproduce", "prefetch", "demo"):
        sub = run(HUBTUNE + [command, "--help"])
        assert sub.returncode == 0 and "usage: hubtune " + command in sub.stdout, sub.stderr


def test_push_of_a_folder_that_is_not_an_export_is_one_line(tmp_path):
    proc = run(HUBTUNE + ["push", str(tmp_path), "alice/x"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hubtune: error: {tmp_path} is not a hubtune export: config.json is missing (train first)"


@pytest.mark.slow
def test_predict_command_on_a_trained_folder(two_class_folder, tmp_path):
    out = tmp_path / "out"
    assert run(HUBTUNE + ["train", *flags(two_class_folder, out)]).returncode == 0
    image = next((two_class_folder / "dog").glob("*.png"))
    proc = run(HUBTUNE + ["predict", str(out), str(image), "--top-k", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result[0]["image"] == str(image)
    from hubtune import ImageClassifier

    expected = ImageClassifier.from_pretrained(out, device="cpu").predict(str(image), top_k=2)[0]
    got = result[0]["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-6)
    assert got[0]["score"] >= got[1]["score"] and sum(p["score"] for p in got) == pytest.approx(1.0)
    card = run(HUBTUNE + ["card", str(out), "--repo-id", "alice/demo"])
    assert card.returncode == 0, card.stderr
    assert "alice/demo" in (out / "README.md").read_text()
