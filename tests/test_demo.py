"""`hubtune demo --quick` end to end, as a user runs it: its own local Hub, publish, an interrupted and resumed
fine-tune through `accelerate launch`, the push, and a clean-process load with hubtune and plain timm."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from hubtune.demo import (
    DATASET_REPO,
    MARKER,
    MIN_ACCURACY,
    MODEL_REPO,
    SUMMARY_FILE,
    DemoError,
    add_demo_arguments,
    prepare_workdir,
)
from hubtune.localhub import LocalHub

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 400  # about a minute on 2 idle cores; generous for a loaded CI machine

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `python -m hubtune.demo --quick` once; (exit code, output, workdir, summary)."""
    workdir = tmp_path_factory.mktemp("demo") / "work"
    # the demo builds its children's environment from its own server, whatever HF_* conftest set here
    proc = subprocess.Popen([sys.executable, "-m", "hubtune.demo", "--quick", "--workdir", str(workdir)], cwd=REPO,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo stops its running step and its server
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"the demo took over {DEMO_TIMEOUT_S}s; its output:\n{out[-5000:]}")
    summary_path = workdir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return proc.returncode, out, workdir, summary


def test_demo_succeeds_narrates_every_step_and_records_timings(demo):
    code, out, workdir, summary = demo
    assert code == 0, out[-5000:]
    assert summary["ok"] and summary["problems"] == [] and summary["quick"] is True
    for n in range(1, 7):
        assert f"[{n}/6]" in out
    # the exact fine-tuning command is printed before it runs: the real entry point, bf16, part of the net frozen
    assert "-m accelerate.commands.launch --num_processes 1" in out and "hubtune/train.py" in out
    for flag in ("--freeze stem,stages.0 --freeze-bn", "--mixed-precision bf16", "--save-every epoch"):
        assert flag in summary["train_command"] and flag in out
    assert "accelerate launch hubtune/train.py --config examples/cats_vs_dogs.yaml --push-to-hub you/name" in out
    timings = summary["timings_s"]
    assert set(timings) == {"publish", "train_interrupted", "train_resumed", "predict", "total"}
    steps = [v for k, v in timings.items() if k != "total"]
    assert 0 < sum(steps) <= timings["total"] + 0.05 * len(steps)  # each figure is rounded to 0.1 s


def test_model_learned_the_task(demo):
    _, out, workdir, summary = demo
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    assert summary["val_accuracy"] == metrics["best"]["val_accuracy"] >= MIN_ACCURACY
    assert len(metrics["history"]) == summary["epochs"] == summary["size"]["epochs"]
    assert metrics["run_info"]["frozen_groups"] and metrics["run_info"]["mixed_precision"] == "bf16"
    # the backbone was pre-trained on another task first, and learned it
    assert summary["backbone"]["pretrain_accuracy"] >= 0.8
    assert summary["backbone"]["pretrain_task"] == ["stripes", "checks", "dots", "rings"]


def test_run_was_interrupted_by_sigterm_and_resumed_from_its_checkpoint(demo):
    _, out, workdir, summary = demo
    stop = summary["interrupt"]
    assert stop["signal"] == "SIGTERM" and "SIGTERM received: saved" in out and "--resume latest" in out
    if sys.platform.startswith("linux"):
        assert stop["train_exit_code"] == 143
    first, saved = (int(stop[k].removeprefix("step-")) for k in ("after_checkpoint", "saved"))
    assert saved > first  # the signal arrived inside epoch 2: a mid-epoch checkpoint
    assert summary["resumed"] is True and summary["resumed_from_step"] == saved
    assert f"resumed from {workdir / 'run' / 'checkpoints' / stop['saved']}" in out
    assert summary["resumed_from_epoch"] == 2
    assert any(Path(p).name == summary["best"]["checkpoint"] for p in summary["paths"]["checkpoints"])


def test_pushed_model_loads_in_a_clean_process_and_both_loaders_agree(demo):
    _, out, workdir, summary = demo
    assert summary["repo_id"] == MODEL_REPO
    assert summary["commit_url"].endswith(f"/{MODEL_REPO}/commit/{summary['revision']}")
    preds = summary["predictions"]
    assert len(preds) == summary["heldout_total"] == summary["size"]["heldout"]
    for p in preds:
        assert Path(p["image"]).is_file() and p["truth"] in ("cat", "dog")
        assert p["hubtune"]["label"] == p["timm"]["label"]
        assert p["hubtune"]["score"] == pytest.approx(p["timm"]["score"], abs=1e-5)
    assert summary["loaders_agree"] is True
    correct = sum(p["hubtune"]["label"] == p["truth"] for p in preds)
    assert correct == summary["heldout_correct"] >= 0.75 * len(preds)


def test_hub_holds_the_three_repos_with_honest_cards(demo):
    """The demo's Hub storage, served again, has the backbone, the synthetic dataset and the fine-tuned model."""
    _, _, workdir, summary = demo
    with LocalHub(workdir / "hub") as hub:
        api = HfApi(endpoint=hub.url, token=False)
        assert api.model_info(MODEL_REPO).sha == summary["revision"]
        files = set(api.list_repo_files(MODEL_REPO))
        assert {"config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml"} <= files
        assert any(f.startswith("plots/") for f in files) and not any(f.startswith("checkpoints/") for f in files)
        backbone = api.model_info(summary["backbone"]["repo_id"])
        assert backbone.card_data.license == "apache-2.0"
        info = api.dataset_info(DATASET_REPO)
        assert "synthetic" in info.card_data.tags and info.card_data.dataset_info  # datasets' metadata kept
        card = Path(hf_hub_download(DATASET_REPO, "README.md", repo_type="dataset", endpoint=hub.url, token=False))
        text = card.read_text()
        assert "**Synthetic data.**" in text and "'cat', 'dog'" in text
    assert (workdir / "run" / "README.md").is_file() and summary["paths"]["plots"]


def test_arguments_and_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args([])
    assert (args.workdir, args.quick, args.keep_server) == (Path("hubtune-demo"), False, False)
    args = parser.parse_args(["--workdir", "w", "--quick", "--keep-server"])
    assert (args.workdir, args.quick, args.keep_server) == (Path("w"), True, True)


def test_workdir_is_reused_only_when_the_demo_made_it(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not empty and was not created by `hubtune demo`"):
        prepare_workdir(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(DemoError, match="is a file"):
        prepare_workdir(foreign / "thesis.tex")
    ours = tmp_path / "ours"
    prepare_workdir(ours)
    (ours / "run" / "checkpoints").mkdir(parents=True)
    (ours / SUMMARY_FILE).write_text("{}")
    (ours / "notes.txt").write_text("kept")
    prepare_workdir(ours)
    assert sorted(p.name for p in ours.iterdir()) == sorted([MARKER, "notes.txt"])
