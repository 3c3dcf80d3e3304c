"""`hubtune reproduce`: rerun a published run from its recorded config and compare the metrics."""

import argparse
import json
import shutil
import uuid

import pytest
from huggingface_hub import HfApi

from hubtune import hub as hub_lib
from hubtune.config import TrainConfig
from hubtune.reproduce import add_reproduce_arguments, run_reproduce
from hubtune.train import train

TOKEN = "tok-alice-write"


@pytest.fixture(scope="module")
def original(two_class_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("original")
    train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(two_class_folder), image_size=32, epochs=2,
                      batch_size=16, lr=3e-3, num_workers=0, max_bad_fraction=0.05, output_dir=str(out),
                      progress=False, seed=7))
    return out


def args(*argv):
    parser = argparse.ArgumentParser()
    add_reproduce_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_dry_run_prints_command_and_downloads(original, tmp_path, capsys):
    assert run_reproduce(args(original, "--output-dir", tmp_path / "r", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert f"command: hubtune train --config {tmp_path / 'r' / 'reproduce_config.yaml'}" in out
    assert "downloads: none (everything is local)" in out
    assert not (tmp_path / "r").exists()


def test_reproduce_from_the_hub_gives_the_same_metrics(hub, original, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = f"alice/repro-{uuid.uuid4().hex[:8]}"
    hub_lib.push(original, hub_lib.PushTarget(repo, token=TOKEN))
    assert "README.md" in HfApi(token=TOKEN).list_repo_files(repo)
    assert run_reproduce(args(repo, "--output-dir", tmp_path / "again")) == 0
    out = capsys.readouterr().out
    assert "identical to the original" in out
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    first = json.loads((original / "metrics.json").read_text())
    assert [h["val_loss"] for h in again["history"]] == pytest.approx([h["val_loss"] for h in first["history"]],
                                                                       abs=1e-6)


def test_differences_are_printed_and_fail(original, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(original, tampered, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((tampered / "metrics.json").read_text())
    metrics["history"][0]["val_loss"] += 0.5
    (tampered / "metrics.json").write_text(json.dumps(metrics))
    assert run_reproduce(args(tampered, "--output-dir", tmp_path / "again")) == 1
    assert "epoch 1 val_loss: original" in capsys.readouterr().out


def test_not_a_hubtune_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no train_config.yaml; only runs made by hubtune can be reproduced"):
        run_reproduce(args(tmp_path))
