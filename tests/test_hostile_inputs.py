"""Hostile and damaged inputs: each ends with one line naming the bad value (exit 2 for usage errors), never a
traceback, and nothing already written is lost. Hub addresses that are not one, checkpoints written to match their
own manifest but holding what no run saves, a run killed before its first checkpoint, a 12 GB sparse image, empty
datasets and outputs that cannot be written."""

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import make_image_dataset
from safetensors.torch import load_file, save_file

from hubtune import checkpoint, hub_checkpoints
from hubtune import hub as hub_lib
from hubtune.config import TrainConfig
from hubtune.errors import CheckpointError, ConfigError, DataError, ModelSourceError, OutputDirError
from hubtune.evaluation import add_evaluate_arguments, run_evaluate
from hubtune.files import sha256_file
from hubtune.predict import add_predict_arguments, run_predict
from hubtune.resume_checks import check_saved
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-alice-write"
SPARSE_SIZE = 12 * 2**30


def tiny(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="test_resnet", pretrained=False, dataset=str(dataset), image_size=32, epochs=2, batch_size=8,
                lr=3e-3, output_dir=str(out), num_workers=0, val_fraction=0.3, save_every="2", progress=False,
                report_to="none", shuffle_buffer=32)
    return TrainConfig(**{**base, **kw})


def hubtune(*argv: str, env: dict | None = None, limit_memory: bool = False) -> subprocess.CompletedProcess:
    """`hubtune ...` as a user runs it; `limit_memory`: in 8 GiB of address space, which a 12 GB read exceeds."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    return subprocess.run([sys.executable, "-m", "hubtune.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=cap if limit_memory else None,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `hubtune: error: ...` line a failed command ends with (no traceback before it)."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hubtune: error: "), proc.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("small"), "imagefolder", per_class=12)


@pytest.fixture(scope="module")
def finished_run(small_folder, tmp_path_factory) -> Path:
    """A two-epoch run: its export, and checkpoints at the end of each epoch and inside the second."""
    out = tmp_path_factory.mktemp("finished")
    train(tiny(small_folder, out))
    assert len(checkpoint.listing(out)) >= 2
    return out


# ---- 1. --resume hf:// addresses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, says", [
    ("hf://alice/x@..", "'..' is not a valid branch"),
    ("hf://alice/x@.hidden/checkpoints/step-000002", "'.hidden' is not a valid branch"),
    ("hf://alice/x@a b", "'a b' is not a valid branch"),
    ("hf://alice/..", "'alice/..'"),
    ("hf://../x", "'../x'"),
    ("hf://alice/.", "'alice/.'"),
    ("hf://alice/x--y", "Cannot have -- or .."),
    ("hf://huggingface.co/alice/x", "(with no host: the Hub is HF_ENDPOINT), e.g. hf://alice/x"),
    ("hf://alice/x/checkpoints/step-000002/../..", "expected hf://ORG/NAME"),
])
def test_hostile_hf_addresses_are_refused_naming_the_value_and_the_accepted_form(spec, says):
    with pytest.raises(ConfigError) as err:
        hub_checkpoints.parse_resume(spec, None, "checkpoints")
    message = str(err.value)
    assert message.startswith(f"--resume {spec!r}: ") and says in message and "\n" not in message
    assert "hf://ORG/NAME[@BRANCH][/checkpoints/step-NNNNNN]" in message


@pytest.mark.slow
def test_hostile_hub_names_end_with_one_line_before_anything_is_built(small_folder, finished_run, tmp_path):
    out = tmp_path / "out"
    assert "--resume 'hf://alice/x@..': '..' is not a valid branch" in one_line_error(hubtune(
        "train", "--model", "test_resnet", "--no-pretrained", "--dataset", str(small_folder), "--output-dir", str(out),
        "--resume", "hf://alice/x@.."))
    with pytest.raises(ConfigError, match="--hub-checkpoints-branch: got '..', expected a branch name"):
        train(tiny(small_folder, out, resume="hub", push_to_hub="alice/x", hub_checkpoints_branch=".."))
    with pytest.raises(ConfigError, match=r"--push-to-hub: got 'alice/\.\.', expected a Hub repo id ORG/NAME"):
        train(tiny(small_folder, out, push_to_hub="alice/.."))
    assert not out.exists()
    assert "'alice/..' is not a Hub repo id" in one_line_error(hubtune("push", str(finished_run), "alice/.."))
    assert "'alice/x@..': '..' is not a valid branch" in one_line_error(hubtune("checkpoints", "alice/x@.."))


def test_bad_model_repo_ids_are_refused_before_any_download(finished_run):
    for source, says in (("alice/..", "'alice/..'"), ("alice/x@..", "'..' is not a valid branch")):
        with pytest.raises(ModelSourceError) as err:
            predict_rows(source, finished_run / "model.safetensors")
        assert str(err.value).startswith(f"{source!r}: ") and says in str(err.value)
        assert str(err.value).endswith("expected org/name[@revision] or an existing local directory")
    with pytest.raises(ConfigError, match=r"'\.\.' is not a Hub repo id .*; expected ORG/NAME"):
        hub_lib.push(finished_run, hub_lib.PushTarget(".."))


# ---- 2. checkpoints that match their manifest but hold what no run saves -----------------------------------------

def remanifest(path: Path) -> None:
    """Make the manifest match the files again: the damage below is not caught by checksums."""
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(path.iterdir()) if p.name != checkpoint.MANIFEST}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def edit_state(path: Path, edit) -> None:
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    edit(state)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state))


def rename_step(path: Path, step: int) -> Path:
    """Give the checkpoint another step everywhere (folder, state, manifest): consistent with itself."""
    edit_state(path, lambda s: s["run_state"].update(global_step=step))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    (path / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "step": step}))
    return path.rename(checkpoint.step_dir(path.parents[1], step))


HOSTILE = {
    "pickle bytes as safetensors": (
        lambda p: torch.save({"w": torch.zeros(2)}, p / "model.safetensors"),
        "model.safetensors is not a safetensors file"),
    "malformed safetensors header": (
        lambda p: (p / "optimizer.safetensors").write_bytes((12).to_bytes(8, "little") + b'{"a": [1, 2]'),
        "optimizer.safetensors is not a safetensors file"),
    "state.json not JSON": (lambda p: (p / "state.json").write_text("{not json"), "state.json is not JSON"),
    "state.json a list": (lambda p: (p / "state.json").write_text("[]"), "state.json holds a JSON list"),
    "best named ../..": (lambda p: edit_state(p, lambda s: s["run_state"]["best"].update(checkpoint="../..")),
                         "run_state.best.checkpoint is '../..', expected a checkpoint of this run"),
    "best an absolute path": (lambda p: edit_state(p, lambda s: s["run_state"]["best"].update(checkpoint="/etc")),
                              "run_state.best.checkpoint is '/etc'"),
    "no optimizer key": (lambda p: edit_state(p, lambda s: s.pop("optimizer")), "optimizer is None"),
    "optimizer without state": (lambda p: edit_state(p, lambda s: s["optimizer"].pop("state")),
                                "expected its state and param_groups"),
    "no per-rank entries": (lambda p: edit_state(p, lambda s: s.pop("ranks")), "ranks is None"),
    "empty per-rank entries": (lambda p: edit_state(p, lambda s: s.update(ranks=[])),
                               "ranks holds 0 entries, expected one per process (1)"),
    "empty rank entry": (lambda p: edit_state(p, lambda s: s.update(ranks=[{}])), "ranks[0] is {}"),
    "no RNG tensors": (lambda p: save_file({}, str(p / "rng.safetensors")),
                       "ranks[0]: its RNG states cannot be set (KeyError: 'numpy_keys')"),
    "negative epoch": (lambda p: edit_state(p, lambda s: s["run_state"].update(epoch=-1)),
                       "run_state.epoch is -1, expected an integer >= 0"),
    "global_step 10**12": (lambda p: edit_state(p, lambda s: s["run_state"].update(global_step=10**12)),
                           "run_state.global_step is 1,000,000,000,000, but the checkpoint is step"),
    "global_step 10**12 everywhere": (lambda p: rename_step(p, 10**12),
                                      "run_state.global_step is 1,000,000,000,000, beyond the 1,000,000,000 steps"),
    "a step its examples cannot reach": (
        lambda p: edit_state(rename_step(p, 900), lambda s: s["run_state"].update(in_epoch=True)),
        "run_state.global_step is 900, which the "),
    "a step past the end of its last epoch": (lambda p: rename_step(p, 900), "but the last epoch in history ended"),
    "global_step a string": (lambda p: edit_state(p, lambda s: s["run_state"].update(global_step="7")),
                             "run_state.global_step is '7'"),
    "history longer than the epochs": (lambda p: edit_state(p, lambda s: s["run_state"]["history"].append(
        s["run_state"]["history"][-1])), "run_state.history holds"),
}


@pytest.mark.parametrize("damage", HOSTILE)
def test_a_checkpoint_that_verifies_but_holds_what_no_run_saves_is_refused_or_skipped(damage, finished_run, tmp_path,
                                                                                      caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", out / "checkpoints")
    *_, previous, newest = checkpoint.listing(out)
    tamper, says = HOSTILE[damage]
    tamper(newest)
    newest = checkpoint.listing(out)[-1]  # (renamed by some)
    remanifest(newest)
    with pytest.raises(CheckpointError) as err:  # named: one line naming the checkpoint and the value
        checkpoint.find_resume(out, str(newest), check=check_saved)
    assert str(err.value).startswith(f"{newest}: ") and says in str(err.value) and "\n" not in str(err.value)
    assert checkpoint.find_resume(out, "latest", check=check_saved) == previous  # latest: the previous one
    assert f"skipping damaged checkpoint: {newest}: " in caplog.text


def test_a_checkpoint_that_does_not_fit_the_model_falls_back_when_latest_and_is_refused_when_named(
        finished_run, small_folder, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    *_, previous, newest = checkpoint.listing(out)
    weights = load_file(str(newest / checkpoint.MODEL_FILE))
    weights["fc.weight"] = torch.zeros(3, *weights["fc.weight"].shape[1:])  # a head of three classes
    save_file(weights, str(newest / checkpoint.MODEL_FILE))
    remanifest(newest)
    check_saved(newest)  # nothing in the files themselves says so
    with pytest.raises(CheckpointError) as err:
        train(tiny(small_folder, out, epochs=3, resume=str(newest)))
    assert str(err.value) == (f"{newest}: its model weights do not fit this model (wrong shape: fc.weight [3, 96] "
                              "(the model's: [2, 96]))")
    assert (newest / checkpoint.MODEL_FILE).is_file() and checkpoint.listing(out)[-1] == newest  # left as it was
    with caplog.at_level(logging.INFO, logger="hubtune"):
        result = train(tiny(small_folder, out, epochs=3, resume="latest"))
    assert f"checkpoint {newest.name} cannot be loaded: {newest}: its model weights do not fit" in caplog.text
    assert f"trying the previous one, {previous.name}" in caplog.text
    assert f"resumed from {previous}" in caplog.text
    assert [row.epoch for row in result.history] == [1, 2, 3]


def test_resume_hub_passes_over_a_hostile_newest_checkpoint_on_the_branch_for_the_previous_one(
        hub, finished_run, small_folder, tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo, api = f"alice/hostile-{uuid.uuid4().hex[:8]}", HfApi(token=TOKEN)
    api.create_repo(repo)
    api.create_branch(repo, branch="checkpoints")
    local = tmp_path / "uploaded"
    shutil.copytree(finished_run / "checkpoints", local)
    *_, previous, newest = sorted(p.name for p in local.iterdir())
    edit_state(local / newest, lambda s: s["run_state"]["best"].update(checkpoint="../.."))
    remanifest(local / newest)
    api.upload_folder(repo_id=repo, folder_path=str(local), path_in_repo="checkpoints", revision="checkpoints")
    out = tmp_path / "elsewhere"
    with caplog.at_level(logging.INFO, logger="hubtune"):
        result = train(tiny(small_folder, out, epochs=3, resume="hub", push_to_hub=repo))
    assert f"--resume hub: skipping {newest}: {out / 'checkpoints' / newest}: state.json: run_state.best.checkpoint " \
           "is '../..'" in caplog.text
    assert f"resumed from {out / 'checkpoints' / previous}" in caplog.text
    assert [row.epoch for row in result.history] == [1, 2, 3]
    with pytest.raises(CheckpointError, match=r"run_state\.best\.checkpoint is '\.\./\.\.'"):  # named: refused
        train(tiny(small_folder, tmp_path / "named", resume=f"hf://{repo}/checkpoints/{newest}"))


@pytest.mark.slow
def test_a_hostile_checkpoint_named_on_the_command_line_ends_with_one_line(finished_run, small_folder, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest = checkpoint.listing(out)[-1]
    edit_state(newest, lambda s: s["run_state"].update(global_step=10**12))
    remanifest(newest)
    line = one_line_error(hubtune("train", "--model", "test_resnet", "--no-pretrained", "--dataset", str(small_folder),
                                  "--output-dir", str(out), "--resume", str(newest)), code=1)
    assert line == (f"hubtune: error: {newest}: state.json: run_state.global_step is 1,000,000,000,000, but the "
                    f"checkpoint is step {checkpoint.step_of(newest.name)}")


# ---- 3. a run killed before its first checkpoint -------------------------------------------------------------------

def killed_before_first_checkpoint(out: Path) -> None:
    """What a run leaves when it is killed before its first checkpoint: its config, curves, a partial save."""
    (out / "runs" / "hubtune").mkdir(parents=True)
    (out / "runs" / "hubtune" / "events.out.tfevents.1.host.1.0").write_bytes(b"partial")
    (out / "checkpoints" / ".tmp-step-000002-4242").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000002-4242" / "model.safetensors").write_bytes(b"partial")
    (out / "train_config.yaml").write_text("epochs: 1\n")


def test_resume_latest_continues_a_run_killed_before_its_first_checkpoint_by_starting_fresh(small_folder, tmp_path,
                                                                                             caplog):
    out = tmp_path / "run"
    killed_before_first_checkpoint(out)
    with caplog.at_level(logging.INFO, logger="hubtune"):
        result = train(tiny(small_folder, out, epochs=1, resume="latest"))
    assert result.metrics.global_step > 0
    assert (f"--resume latest: {out} holds only what a run writes before its first checkpoint (checkpoints, "
            "train_config.yaml, runs); replacing it and starting fresh") in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [p.name for p in checkpoint.listing(out)]
    assert not (out / "runs" / "hubtune" / "events.out.tfevents.1.host.1.0").exists()


def test_resume_hub_with_nothing_on_the_hub_continues_a_run_killed_before_its_first_checkpoint(
        hub, small_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = f"alice/killed-early-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    killed_before_first_checkpoint(out)
    with caplog.at_level(logging.INFO, logger="hubtune"):
        result = train(tiny(small_folder, out, epochs=1, resume="hub", push_to_hub=repo))
    assert result.metrics.global_step > 0
    assert f"--resume hub: no checkpoint on {repo}@checkpoints yet, starting fresh" in caplog.text
    assert "holds only what a run writes before its first checkpoint" in caplog.text


def test_resume_latest_still_refuses_to_overwrite_a_finished_export_without_checkpoints(finished_run, small_folder,
                                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(OutputDirError, match=r"holds an earlier run \(train_config.yaml, metrics.json, "
                                             r"model.safetensors, .*\) and no checkpoint to continue it from; pass "
                                             r"--overwrite-output-dir to replace it"):
        train(tiny(small_folder, out, epochs=1, resume="latest"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---- 4. a 12 GB sparse image ---------------------------------------------------------------------------------------

def sparse_image(path: Path) -> Path:
    """A file that claims 12 GB and takes no disk (all holes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(SPARSE_SIZE)
    return path


@pytest.mark.slow
def test_predict_reports_a_12_gb_sparse_file_as_one_error_row_without_reading_it(finished_run, small_folder,
                                                                                tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(small_folder / "cat", folder)
    sparse_image(folder / "huge.jpg")
    proc = hubtune("predict", str(finished_run), str(folder), "--output", str(tmp_path / "preds.jsonl"),
                   limit_memory=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["image"]).name: r for r in map(json.loads, (tmp_path / "preds.jsonl").read_text().splitlines())}
    assert rows["huge.jpg"] == {"image": str(folder / "huge.jpg"), "error": (
        "the file is 12.0 GiB, over the 1 GiB limit for one image (hubtune.data.MAX_IMAGE_BYTES)")}
    assert sum("predictions" in r for r in rows.values()) == len(rows) - 1
    assert f"1 of {len(rows)} images could not be read" in proc.stderr


def test_image_classifier_refuses_a_12_gb_sparse_file_in_one_line_without_reading_it(finished_run, tmp_path):
    from hubtune import ImageClassifier
    from hubtune.errors import ConfigError

    huge = sparse_image(tmp_path / "huge.jpg")
    with pytest.raises(ConfigError, match=r"huge.jpg.*: the file is 12.0 GiB, over the 1 GiB limit"):
        ImageClassifier.from_pretrained(str(finished_run)).predict([huge])


@pytest.mark.slow
def test_evaluate_skips_and_counts_a_12_gb_sparse_file_without_reading_it(finished_run, small_folder, tmp_path):
    dataset = tmp_path / "theirs"
    for name in ("cat", "dog"):
        shutil.copytree(small_folder / name, dataset / "test" / name)
    sparse_image(dataset / "test" / "cat" / "huge.jpg")
    proc = hubtune("evaluate", str(finished_run), "--dataset", str(dataset), "--num-workers", "0",
                   "--max-bad-fraction", "0.1", "--output-dir", str(tmp_path / "eval"), limit_memory=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert result["skipped_images"] == 1 and result["examples"] == 30
    huge = dataset / "test" / "cat" / "huge.jpg"
    assert f"skipping {huge}: the file is 12.0 GiB, over the 1 GiB limit" in proc.stderr


# ---- 5. empty datasets, outputs that cannot be written -------------------------------------------------------------

def predict_rows(source: str | Path, *images: Path, output: Path | None = None) -> int:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return run_predict(parser.parse_args([str(source), *map(str, images)]
                                         + (["--output", str(output)] if output else [])))


def evaluate(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(list(argv)))


@pytest.fixture
def empty_datasets(tmp_path) -> dict[str, Path]:
    empty, classes = tmp_path / "empty", tmp_path / "empty_classes"
    empty.mkdir()
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
    return {"an empty directory": empty, "empty class directories": classes}


@pytest.mark.slow
def test_empty_datasets_are_one_line_errors_for_train_evaluate_and_predict(finished_run, empty_datasets, tmp_path):
    for folder in empty_datasets.values():
        says = re.escape(f"--dataset '{folder}': this directory holds no image or parquet files")
        with pytest.raises(DataError, match=says):
            train(tiny(folder, tmp_path / "out"))
        with pytest.raises(DataError, match=says):
            evaluate(str(finished_run), "--dataset", str(folder), "--output-dir", str(tmp_path / "eval"))
        with pytest.raises(ConfigError, match=re.escape(f"{folder}: no image files")):
            predict_rows(finished_run, folder)
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()
    empty = empty_datasets["an empty directory"]
    line = one_line_error(hubtune("evaluate", str(finished_run), "--dataset", str(empty)))
    assert "this directory holds no image or parquet files" in line


def test_outputs_that_cannot_be_written_are_one_line_errors_and_nothing_is_lost(finished_run, small_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    image = small_folder / "cat" / "cat_0000.jpeg"
    with pytest.raises(ConfigError, match=re.escape(f"--output '{blocker}/preds.csv' cannot be written: {blocker} is "
                                                    "a file")):
        predict_rows(finished_run, image, output=blocker / "preds.csv")
    with pytest.raises(ConfigError, match=r"--output '/proc/hubtune-nowhere/preds.csv' cannot be written \(No such"):
        predict_rows(finished_run, image, output=Path("/proc/hubtune-nowhere/preds.csv"))
    (tmp_path / "taken.csv").mkdir()
    with pytest.raises(ConfigError, match=r"taken.csv is a directory"):
        predict_rows(finished_run, image, output=tmp_path / "taken.csv")
    for where in (blocker, blocker / "eval"):
        with pytest.raises(OutputDirError, match=re.escape(f"--output-dir '{where}' cannot be written: {blocker} is a "
                                                           "file")):
            evaluate(str(finished_run), "--dataset", str(small_folder), "--split", "train", "--output-dir", str(where))
    with pytest.raises(OutputDirError, match=re.escape(f"--output-dir '{blocker}' is a file")):
        train(tiny(small_folder, blocker))
    assert blocker.read_text() == "mine"
    line = one_line_error(hubtune("predict", str(finished_run), str(image), "--output", str(blocker / "p.jsonl")))
    assert line == f"hubtune: error: --output '{blocker}/p.jsonl' cannot be written: {blocker} is a file; give a " \
                   "writable file path"
