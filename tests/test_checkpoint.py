"""Checkpoints: exact resume after SIGKILL (once and twice), SIGTERM, atomicity, retention, best, early stopping."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubtune import checkpoint
from hubtune.config import TrainConfig
from hubtune.records import EpochRow
from hubtune.run_state import BestPolicy, RunState, update_best
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]


def flags(dataset, out, *extra):
    return ["--model", "test_resnet", "--no-pretrained", "--dataset", str(dataset), "--image-size", "32",
            "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--max-bad-fraction", "0.05", "--no-progress",
            "--output-dir", str(out), "--save-every", "4", "--log-every", "1", "--shuffle-buffer", "48",
            # dropout draws from the global torch RNG every step: a resume that did not restore it would diverge
            "--drop-rate", "0.3",
            # the whole run state: EMA weights, and a schedule whose second part starts in epoch 2 (the second kill
            # resumes after it, the first before), TensorBoard curves
            "--freeze", "stem,stages", "--unfreeze-at", "stages.3=2,all=3", "--model-ema", "--model-ema-decay", "0.9",
            "--report-to", "tensorboard", *extra]


def start(args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hubtune.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_until(args, line_marker: str, sig: int) -> tuple[int, str]:
    """Start a run, read its log until `line_marker` appears after a first checkpoint, then send `sig`."""
    proc = start(args)
    seen, saved = [], False
    for line in proc.stderr:
        seen.append(line)
        saved = saved or "saved checkpoint" in line
        if saved and line_marker in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=300)
    return code, "".join(seen) + rest


def finish(args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hubtune.cli", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def latest_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.listing(out)[-1] / checkpoint.MODEL_FILE))


def history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def reference(two_class_folder, tmp_path_factory):
    """An uninterrupted run (one DataLoader worker, so worker state is part of what resumes)."""
    out = tmp_path_factory.mktemp("reference")
    proc = finish(flags(two_class_folder, out, "--num-workers", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run's TensorBoard files, as TensorBoard shows them ((step, value), orphans purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "hubtune")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_run(out: Path, reference: Path) -> None:
    """Bitwise: the resumed run is the same run, not a close one (its EMA weights and its curves included)."""
    for name in (checkpoint.MODEL_FILE, checkpoint.EMA_TENSORS):
        ref = load_file(str(checkpoint.listing(reference)[-1] / name))
        got = load_file(str(checkpoint.listing(out)[-1] / name))
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), (name, key)
    assert history(out) == history(reference)
    curves, ref_curves = tensorboard_scalars(out), tensorboard_scalars(reference)
    assert sorted(curves) == sorted(ref_curves)
    for tag, points in curves.items():  # one point per step, as many as the uninterrupted run logged
        assert [step for step, _ in points] == [step for step, _ in ref_curves[tag]], tag


@pytest.mark.slow
@pytest.mark.parametrize("kills", [1, 2])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(kills, two_class_folder, tmp_path, reference):
    args = flags(two_class_folder, tmp_path, "--num-workers", "1")
    for i, marker in enumerate(["step 6 |", "step 23 |"][:kills]):
        code, log = run_until(args + (["--resume", "latest"] if i else []), marker, signal.SIGKILL)
        assert code == -signal.SIGKILL, log[-2000:]
    # The reference keeps its worker across epochs. Killed once, this run finishes epochs 1-3 on workers started
    # for each pass; killed twice, its second part crossed an epoch on a persistent worker.
    done = finish(args + ["--resume", "latest"] + (["--no-persistent-workers"] if kills == 1 else []))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_reached_and_exits_with_resume_hint(two_class_folder, tmp_path, reference):
    args = flags(two_class_folder, tmp_path, "--num-workers", "1")
    code, log = run_until(args, "step 9 |", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, log[-2000:]
    assert "SIGTERM received: saved" in log and "--resume latest" in log
    saved_step = int(log.split("SIGTERM received: saved ")[1].split("step-")[1][:6])
    assert saved_step >= 9
    state = json.loads((checkpoint.step_dir(tmp_path, saved_step) / checkpoint.STATE_FILE).read_text())
    assert state["run_state"]["in_epoch"] and state["run_state"]["global_step"] == saved_step
    done = finish(args + ["--resume", "latest"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_damaged_latest_falls_back_to_previous_and_partial_saves_are_invisible(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    *older, previous, newest = checkpoint.listing(out)
    assert older, "the reference keeps the best and the last two checkpoints"
    flip_byte(newest / checkpoint.MODEL_FILE)  # same size: only the sha256 in the manifest tells
    (out / "checkpoints" / ".tmp-step-999999-1").mkdir()  # a save killed mid-write
    assert checkpoint.find_resume(out, "latest") == previous
    (previous / checkpoint.OPTIMIZER_TENSORS).unlink()
    assert checkpoint.find_resume(out, "latest") == older[-1]
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.find_resume(out, str(newest))


@pytest.mark.slow
def test_resume_path_that_does_not_exist_lists_the_checkpoints(reference):
    names = [p.name for p in checkpoint.listing(reference)]
    with pytest.raises(checkpoint.CheckpointError, match=f"does not exist; checkpoints in .*: {names[0]}"):
        checkpoint.find_resume(reference, str(reference / "checkpoints" / "step-424242"))


@pytest.mark.slow
def test_retention_keeps_last_k_and_best(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    names = [p.name for p in checkpoint.listing(reference)]
    best = metrics["best"]["checkpoint"]
    assert best in names
    assert len([n for n in names if n != best]) <= 2
    assert names[-1] == f"step-{metrics['global_step']:06d}"
    assert not list((reference / "checkpoints").glob(".tmp-*"))


def test_checkpoint_holds_everything_to_continue(reference):
    path = checkpoint.listing(reference)[-1]
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                 "ema.safetensors", "state.json", "manifest.json"}
    state = json.loads((path / "state.json").read_text())
    assert state["config"]["model"] == "test_resnet" and state["run"]["class_names"] == ["cat", "dog"]
    assert {"epoch", "global_step", "history", "best", "bad_evals"} <= set(state["run_state"])
    assert state["ranks"][0]["progress"]["loader"] is not None
    assert state["optimizer"]["param_groups"]
    assert state["unfrozen"] == ["stages.3", "all"]  # which parts train, as of this checkpoint
    # the EMA holds every tensor but the parameters still frozen (none, at the end of this schedule)
    assert load_file(str(path / "ema.safetensors")).keys() == load_file(str(path / "model.safetensors")).keys()


def test_curves_export_and_card_of_a_run_with_ema_and_gradual_unfreezing(reference):
    import timm

    metrics = json.loads((reference / "metrics.json").read_text())
    curves = tensorboard_scalars(reference)
    for row in metrics["history"]:  # TensorBoard holds float32: the same numbers at that precision
        for tag, key in (("val/accuracy", "val_accuracy"), ("val/loss", "val_loss"), ("val/f1", "val_f1")):
            assert dict(curves[tag])[row["step"]] == pytest.approx(row[key], rel=1e-6)
            assert dict(curves[f"ema_{tag}"])[row["step"]] == pytest.approx(row["ema"][key], rel=1e-6)
        assert dict(curves["val/f1/cat"])[row["step"]] == pytest.approx(row["per_class"]["cat"]["f1"], rel=1e-6)
    steps = [step for step, _ in curves["train/loss"]]
    assert steps == list(range(1, metrics["global_step"] + 1))  # --log-every 1
    assert dict(curves["best/val_accuracy"])[metrics["global_step"]] == pytest.approx(metrics["best"]["val_accuracy"])
    best = metrics["best"]
    expected = checkpoint.load_weights(reference / "checkpoints" / best["checkpoint"], ema=best["weights"] == "ema")
    exported = load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    assert timm.create_model(f"local-dir:{reference}", pretrained=True).num_classes == 2
    card = (reference / "README.md").read_text()
    assert "- **Gradual unfreezing:** `--unfreeze-at stages.3=2,all=3`" in card and "[`runs/`](runs/)" in card
    assert ("**EMA weights:**" in card) == (best["weights"] == "ema")


def scripted_cfg(**kw):
    return TrainConfig(**kw)


def test_early_stopping_on_a_scripted_metric_sequence():
    cfg = scripted_cfg(metric="val_loss", early_stopping_patience=2, early_stopping_min_delta=0.01)
    state = RunState()
    for epoch, loss in enumerate([1.0, 0.8, 0.795, 0.7905, 0.5], start=1):
        update_best(state, EpochRow.from_json({"epoch": epoch, "step": epoch, "val_loss": loss}),
                    BestPolicy.from_config(cfg))
        if state.stopped:
            break
    assert state.stopped.reason == "early_stopping" and state.stopped.epoch == 4
    assert state.best.epoch == 2
    cfg = scripted_cfg(metric="val_accuracy", early_stopping_patience=1)
    state = RunState()
    for epoch, acc in enumerate([0.5, 0.7, 0.7], start=1):
        update_best(state, EpochRow.from_json({"epoch": epoch, "step": epoch, "val_accuracy": acc}),
                    BestPolicy.from_config(cfg))
    assert state.stopped.epoch == 3 and state.best.epoch == 2


def tiny(dataset, out, **kw):
    base = dict(model="test_resnet", pretrained=False, dataset=str(dataset), image_size=32, epochs=2, batch_size=16,
                lr=3e-3, output_dir=str(out), num_workers=0, max_bad_fraction=0.05, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_export_is_best_not_last_and_early_stopping_counter_survives_resume(two_class_folder, tmp_path):
    # nothing can improve val_accuracy by more than 0.5 after the first epoch: epoch 1 stays the best
    cfg = tiny(two_class_folder, tmp_path, epochs=2, early_stopping_patience=2, early_stopping_min_delta=0.5)
    first = train(cfg)
    assert first.metrics.stopped.reason == "max_epochs" and first.best.epoch == 1
    best_dir = tmp_path / "checkpoints" / first.best.checkpoint
    exported = load_file(str(tmp_path / "model.safetensors"))
    best = load_file(str(best_dir / "model.safetensors"))
    last = latest_weights(tmp_path)
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    assert any(not torch.equal(exported[k], last[k]) for k in exported)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["best"]["epoch"] == 1 and m["best"]["checkpoint"] == first.best.checkpoint
    # one evaluation without improvement was counted; resumed with more epochs, the second one stops the run
    again = train(tiny(two_class_folder, tmp_path, epochs=6, early_stopping_patience=2, early_stopping_min_delta=0.5,
                       resume="latest"))
    assert again.metrics.stopped.reason == "early_stopping" and again.metrics.stopped.epoch == 3
    assert [h.epoch for h in again.history] == [1, 2, 3]


def test_resume_with_a_different_run_is_refused_naming_each_difference(two_class_folder, two_class_parquet, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cfg = tiny(two_class_parquet, out, batch_size=4, resume="latest")
    with pytest.raises(ValueError) as err:
        train(cfg)
    msg = str(err.value)
    assert "the run would change meaning" in msg
    assert f"--dataset: checkpoint has {str(two_class_folder)!r}, this run has {str(two_class_parquet)!r}" in msg
    assert "--batch-size: checkpoint has 8, this run has 4" in msg


def test_resume_latest_without_checkpoints_starts_fresh(two_class_folder, tmp_path):
    result = train(tiny(two_class_folder, tmp_path, epochs=1, resume="latest"))
    assert result.metrics.global_step > 0


@pytest.mark.slow
def test_checkpoints_command_marks_best_and_latest(reference):
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "checkpoints", str(reference)], capture_output=True,
                          text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["checkpoint", "step", "position", "metric", "size"]
    assert any(line.rstrip().endswith("latest") for line in lines) and any("best" in line for line in lines)
    assert "MiB" in proc.stdout


def test_a_different_process_count_is_refused(reference):
    from hubtune.run_state import resume_differences

    saved = json.loads((checkpoint.listing(reference)[-1] / checkpoint.STATE_FILE).read_text())
    cfg = TrainConfig(**saved["config"])
    run = {**saved["run"], "num_processes": 2}
    assert resume_differences(saved, cfg, saved["run"]) == []
    assert resume_differences(saved, cfg, run) == ["number of processes: checkpoint has 1, this run has 2"]


def loader(path, persistent=False):
    """A 2-worker loader whose pixel values are seeded random draws: they change with the epoch, as augmentation."""
    from hubtune import data, stream
    from hubtune.job import dataset_source

    train_src, _, info = data.open_splits(dataset_source(TrainConfig(dataset=str(path))))
    source = data.process_source(train_src, info, rank=0, world_size=1, shuffle_seed=1)
    s = stream.ExampleStream(source, lambda img: torch.randint(0, 2**31, ()), keep_val=False, val_fraction=0.1,
                             seed=1, shuffle_buffer=16)
    return stream.make_loader(s, batch_size=8, num_workers=2, pin_memory=False, persistent_workers=persistent)


def values(batches) -> list[int]:
    return [v for b in batches for v in b.pixel_values.tolist()]


def test_loader_position_restores_exactly_with_two_workers_over_two_row_groups(two_row_groups):
    """Each worker holds fewer shards than the stream: datasets' own worker split could not restore this."""
    first = loader(two_row_groups)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    rest = values(it)
    restored = loader(two_row_groups)
    restored.load_state_dict(state)
    assert len(rest) > 0 and values(restored) == rest


def test_persistent_workers_serve_every_epoch_as_fresh_workers_would(two_row_groups):
    persistent, fresh = loader(two_row_groups, persistent=True), loader(two_row_groups)
    epochs, pids = [], set()
    for epoch in range(4):
        for ld in (persistent, fresh):
            ld.dataset.set_epoch(epoch)
        # epoch 1 stops after 3 batches (--max-steps, or another process ran out first): the next one starts afresh
        take = 3 if epoch == 1 else None
        got = values(islice(persistent, take))
        pids.add(tuple(w.pid for w in persistent._iterator._workers))
        assert got == values(islice(fresh, take)), f"epoch {epoch}"
        epochs.append(got)
    assert len(pids) == 1, "the workers were replaced"
    assert len({tuple(e) for e in epochs}) == 4  # the epoch reached the workers: order and draws changed


def test_persistent_workers_report_a_new_pass_from_its_start(two_row_groups):
    """The first batch of a pass comes from one worker; the other's saved position must be this pass's start."""
    persistent = loader(two_row_groups, persistent=True)
    values(persistent)  # epoch 0, whole
    persistent.dataset.set_epoch(1)
    it = iter(persistent)
    next(it)
    state = persistent.state_dict()
    rest = values(it)
    restored = loader(two_row_groups)
    restored.load_state_dict(state)
    assert len(rest) > 0 and values(restored) == rest


def test_persistent_workers_are_replaced_when_the_stream_settings_change(two_row_groups):
    persistent = loader(two_row_groups, persistent=True)
    keys = {k for b in persistent for k in b.keys}
    persistent.dataset.images, persistent.dataset.known_keys = False, frozenset(keys)  # a feature-cache replay
    replay = list(persistent)
    assert {k for b in replay for k in b.keys} == keys
    assert all(b.pixel_values is None for b in replay)


def flip_byte(path: Path, offset: int = -100) -> None:
    """Damage a file without changing its size: only the sha256 in the manifest can tell."""
    with path.open("r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_best_checkpoint_is_never_exported(damage, two_class_folder, tmp_path):
    # epoch 1 stays the best (nothing improves val_accuracy by 0.5); its checkpoint is damaged before the run ends
    cfg = tiny(two_class_folder, tmp_path, epochs=2, early_stopping_min_delta=0.5)
    first = train(cfg)
    best_dir = tmp_path / "checkpoints" / first.best.checkpoint
    if damage == "truncated":
        with (best_dir / checkpoint.MODEL_FILE).open("r+b") as f:
            f.truncate(1000)
    else:
        flip_byte(best_dir / checkpoint.MODEL_FILE)
    damaged = (best_dir / checkpoint.MODEL_FILE).read_bytes()
    again = train(tiny(two_class_folder, tmp_path, epochs=3, early_stopping_min_delta=0.5, resume="latest"))
    exported = (tmp_path / "model.safetensors").read_bytes()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    fallback = metrics["export_fallback"]
    assert fallback["wanted"] == first.best.checkpoint and "damaged" in fallback["reason"]
    assert metrics["best"]["checkpoint"] == fallback["exported"] != first.best.checkpoint
    intact = load_file(str(tmp_path / "checkpoints" / fallback["exported"] / checkpoint.MODEL_FILE))
    assert all(torch.equal(v, load_file(str(tmp_path / "model.safetensors"))[k]) for k, v in intact.items())
    assert exported != damaged
    assert again.metrics.best.epoch == metrics["best"]["epoch"] != 1
    card = (tmp_path / "README.md").read_text()
    assert f"**Not the best epoch's weights:** the checkpoint of epoch 1 (`{first.best.checkpoint}`)" in card


def test_manifests_that_list_nothing_or_garbage_mark_the_checkpoint_damaged(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest, previous = checkpoint.listing(out)[-1], checkpoint.listing(out)[-2]
    (newest / checkpoint.MANIFEST).write_text(json.dumps({"step": 1, "files": []}))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable manifest.json"):
        checkpoint.verify(newest)
    (newest / checkpoint.MANIFEST).write_text(json.dumps({"step": 1, "files": {}}))
    with pytest.raises(checkpoint.CheckpointError, match="does not list model.safetensors"):
        checkpoint.verify(newest)
    assert checkpoint.find_resume(out, "latest") == previous
    from hubtune.commands import local_checkpoint_rows

    rows = {row[0]: row for row in local_checkpoint_rows(out)}
    assert rows[newest.name][-1].startswith("DAMAGED: ") and "latest" in rows[previous.name][-1]


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_checkpoint(small_disk):
    from hubtune.errors import DiskFullError

    weights = {"w": torch.randn(256, 1024)}  # 1 MiB
    ranks = [({"progress": {}}, {"torch": torch.get_rng_state()})]
    first = checkpoint.write(small_disk, 1, weights, {}, {}, ranks, {"run_state": {}})
    # known to be short before writing: nothing is started
    with pytest.raises(DiskFullError, match=r"saving checkpoint step-000002: not enough space in .*checkpoints \("
                                           r"[\d.]+ MiB free, about 4\.\d MiB needed\)"):
        checkpoint.write(small_disk, 2, {"w": torch.randn(1024, 1024)}, {}, {}, ranks, {"run_state": {}})
    # enough by the estimate, short in fact (the manifest and block rounding come on top): the partial save goes
    # what write() estimates: the tensors and state.json (under 200 bytes here); a block more is left free
    estimate = weights["w"].numel() * 4 + torch.get_rng_state().numel() + 200
    free = __import__("shutil").disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - estimate - 4096))
    with pytest.raises(DiskFullError, match="not enough space") as err:
        checkpoint.write(small_disk, 3, weights, {}, {}, ranks, {"run_state": {}})
    assert err.value.__cause__ is not None  # it failed while writing, not in the check before
    assert [p.name for p in (small_disk / "checkpoints").iterdir()] == [first.name]
    checkpoint.verify(first)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["12m"], indirect=True)
def test_a_run_that_fills_its_disk_stops_with_one_line_and_keeps_its_checkpoints(small_disk, two_class_folder):
    out = small_disk / "run"
    proc = finish(flags(two_class_folder, out, "--num-workers", "0", "--save-every", "2", "--keep-last", "5"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hubtune: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(rf"saving checkpoint step-\d+: not enough space in {out}/checkpoints \([\d.]+ MiB free, about "
                     r"[\d.]+ MiB needed\); free some space", errors[0]), errors[0]
    kept = checkpoint.listing(out)
    assert len(kept) >= 1 and not list((out / "checkpoints").glob(".tmp-*"))
    for path in kept:
        checkpoint.verify(path)
