"""The run's records read and write exactly the files earlier hubtune versions wrote (no training here: the fixtures
in tests/fixtures/records/ are a 2-epoch --model-ema --calibrate run's metrics.json, checkpoint state.json, config.json,
train_config.yaml and model card, written by the code before the records existed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hubtune import card
from hubtune.config import TrainConfig
from hubtune.records import BestRecord, EpochRow, RunInfo, RunRecord, StopRecord
from hubtune.run_state import BestPolicy, RunState, update_best

FIXTURES = Path(__file__).parent / "fixtures" / "records"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A copy of the recorded run (rendering the card writes its plots next to it)."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("metrics.json", "config.json", "train_config.yaml"):
        shutil.copy(FIXTURES / name, folder / name)
    return folder


def test_metrics_json_round_trips_key_for_key_in_order():
    written = load("metrics.json")
    record = RunRecord.from_json(written)
    assert record.to_json() == written
    assert json.dumps(record.to_json(), indent=2) == json.dumps(written, indent=2)  # same bytes: same key order
    assert record.best is not None and record.best.checkpoint == "step-000004" and record.best.weights == "model"
    assert [row.epoch for row in record.history] == [1, 2] and all(row.ema is not None for row in record.history)
    assert record.stopped == StopRecord(reason="max_epochs", epoch=2, step=8, detail="completed --epochs 2")
    assert record.calibration is not None and record.calibration.n_bins == len(record.calibration.bins_after) - 1


def test_per_class_scores_keep_the_classifier_order():
    record = RunRecord.from_json(load("metrics.json"))
    assert list(record.history[0].val.per_class) == list(load("metrics.json")["history"][0]["per_class"])
    row = load("metrics.json")["history"][0]
    reordered = {**row, "per_class": dict(reversed(list(row["per_class"].items())))}
    assert list(EpochRow.from_json(reordered).to_json()["per_class"]) == list(reordered["per_class"])


def test_run_info_keeps_keys_it_does_not_know_and_reads_older_ones_as_none():
    written = load("metrics.json")["run_info"]
    newer = {**written, "added_later": {"x": 1}}
    assert RunInfo.from_json(newer).to_json() == newer
    older = {k: v for k, v in written.items() if k not in ("validation", "class_balance")}
    info = RunInfo.from_json(older)
    assert info.validation is None and info.class_balance is None and info.val_source == "hash:0.1"


def test_checkpoint_state_round_trips():
    saved = load("state.json")["run_state"]
    state = RunState.from_dict(saved)
    assert state.to_dict() == saved
    assert isinstance(state.best, BestRecord) and state.best.checkpoint == "step-000004"
    assert RunState().to_dict()["best"] == {} and RunState.from_dict(RunState().to_dict()) == RunState()


def test_the_saved_state_passes_the_resume_checks_and_a_malformed_record_does_not():
    from hubtune import resume_checks

    saved = load("state.json")
    assert resume_checks._state_problem(saved, 8) is None
    saved["run_state"]["best"]["ema"] = {"val_loss": 0.1, "per_class": ["not", "a", "mapping"]}
    assert "run_state's history, best or stopped cannot be read" in resume_checks._state_problem(saved, 8)


def test_an_ema_best_is_written_as_the_row_with_the_ema_metrics_on_top():
    row = load("metrics.json")["history"][1]
    ema = {**row["ema"], "val_loss": row["val_loss"] / 2, "val_accuracy": 1.0}
    row = {**row, "ema": ema}
    state = RunState()
    cfg = TrainConfig(dataset="x", metric="val_loss")
    assert update_best(state, EpochRow.from_json(row), BestPolicy.from_config(cfg), "step-000008")
    assert state.best is not None and state.best.ema and state.best.metrics.accuracy == 1.0
    # what run_state wrote before the records: {**row, **row["ema"], "weights": "ema"}, then the checkpoint
    assert state.best.to_json() == {**row, **row["ema"], "weights": "ema", "checkpoint": "step-000008"}
    assert BestRecord.from_json(state.best.to_json()) == state.best


def test_an_export_fallback_best_without_weights_round_trips():
    row = load("metrics.json")["history"][0]
    written = {**row, "checkpoint": "step-000004"}  # export_best's fallback: a history row and its checkpoint
    assert BestRecord.from_json(written).to_json() == written
    metrics = {**load("metrics.json"), "best": written}
    metrics["export_fallback"] = {"wanted": "step-000008", "wanted_epoch": 2, "exported": "step-000004",
                                  "reason": "model.safetensors: sha256 differs from the manifest"}
    del metrics["calibration"]
    metrics["calibration"] = load("metrics.json")["calibration"]  # written after the fallback, as export_best does
    assert RunRecord.from_json(metrics).to_json() == metrics
    assert list(RunRecord.from_json(metrics).to_json()) == list(metrics)


def test_the_card_renders_the_recorded_run_as_it_did(run_dir):
    rendered = card.render_card(run_dir)
    assert str(rendered) == (FIXTURES / "README.md").read_text()


def test_an_older_metrics_json_loads_and_renders_unknown(run_dir):
    """metrics.json from before run_info, segments, wall time, the EMA and the weights marker."""
    old = load("metrics.json")
    for key in ("run_info", "segments", "wall_time_s", "examples_seen", "skipped_images"):
        del old[key]
    for row in (*old["history"], old["best"]):
        del row["ema"]
    del old["best"]["weights"]
    (run_dir / "metrics.json").write_text(json.dumps(old))

    record = RunRecord.from_json(old)
    assert record.segments == 1 and record.wall_time_s is None and record.run_info == RunInfo()
    assert record.skipped is None and record.best is not None and record.best.weights is None
    assert BestRecord.from_json(old["best"]).to_json() == old["best"]
    text = card.render_card(run_dir).text
    assert "**Validation split:** unknown" in text
    assert "| torch | unknown |" in text
    assert "EMA weights" not in text


def test_a_metrics_json_without_a_best_is_refused_with_the_reason(run_dir):
    metrics = load("metrics.json")
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "best": {}}))
    with pytest.raises(ValueError, match="records no evaluation"):
        card.render_card(run_dir)


def test_upload_reports_round_trip_in_metrics_json_and_say_why_a_checkpoint_did_not_reach_the_hub():
    """--push-every-save's and --hub-checkpoints' reports are records too: metrics.json keeps their keys."""
    from hubtune.background import BackgroundPusher
    from hubtune.records import CheckpointUploads

    written = {**load("metrics.json"),
               "background_pushes": {"pushed": ["https://hub/commit/1"],
                                     "failed": [{"item": "snapshot-2", "error": "HTTP 503"}]},
               "hub_checkpoints": {"repo": "alice/run", "branch": "checkpoints", "uploaded": ["step-000002"],
                                   "failed": [{"checkpoint": "step-000004", "error": "timed out"}],
                                   "superseded": ["step-000003"]}}
    record = RunRecord.from_json(written)
    assert json.dumps(record.to_json(), indent=2) == json.dumps(written, indent=2)
    uploads = record.hub_checkpoints
    assert isinstance(uploads, CheckpointUploads) and uploads.failure("step-000004") == "timed out"
    assert uploads.failure("step-000002") is None
    # what the pusher's thread records is what its report says
    pusher = BackgroundPusher(lambda item, cancel: f"pushed {item.name}")
    pusher.submit(Path("snapshot-1"))
    assert pusher.close(timeout=30, drain=True)  # waits for the thread: no race
    assert pusher.report().to_json() == {"pushed": ["pushed snapshot-1"], "failed": []}
