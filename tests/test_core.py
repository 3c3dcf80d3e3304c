"""Fast, exact tests of the functions where a silent bug costs most: checkpoint integrity and discovery, resume
checks, best/early stopping, the split keys, the push retry/verify helpers, config validation.

They are what mutation testing runs against (`mutmut run`, see README "Test"): each assertion pins a behaviour
exactly, so a changed comparison, constant or branch in those functions fails here, in seconds.
"""

import hashlib
import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from hubtune import checkpoint, hub, hub_calls, stream
from hubtune.config import UPPER_BOUNDS, TrainConfig
from hubtune.errors import CheckpointError, ConfigError, PushError
from hubtune.records import EpochRow
from hubtune.run_state import BestPolicy, EpochProgress, RunState, resume_differences, update_best

# ---- checkpoints -------------------------------------------------------------------------------------------------

def save(root: Path, step: int, value: float = 1.0, state: dict | None = None) -> Path:
    ranks = [({"progress": {"n": step}}, {"torch": torch.tensor([step])})]
    return checkpoint.write(root, step, {"w": torch.full((4,), value)}, {"param_groups": []}, {"m": torch.ones(2)},
                            ranks, state or {"run_state": {"global_step": step}})


def test_a_checkpoint_is_written_complete_and_read_back_exactly(tmp_path):
    path = save(tmp_path, 7, 2.5)
    assert path == tmp_path / "checkpoints" / "step-000007" and path.name == checkpoint.step_dir(tmp_path, 7).name
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                                                       "rng.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and sorted(manifest["files"]) == sorted(checkpoint.REQUIRED)
    for name, meta in manifest["files"].items():
        assert meta == {"size": (path / name).stat().st_size,
                        "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    state, model, opt, ranks = checkpoint.read(path)
    assert state["run_state"] == {"global_step": 7} and state["ranks"] == [{"progress": {"n": 7}}]
    assert state["optimizer"] == {"param_groups": []}
    assert torch.equal(model["w"], torch.full((4,), 2.5)) and torch.equal(opt["m"], torch.ones(2))
    assert torch.equal(checkpoint.rank_tensors(ranks, 0)["torch"], torch.tensor([7]))
    assert checkpoint.rank_tensors(ranks, 1) == {}
    assert torch.equal(checkpoint.load_weights(path)["w"], model["w"])
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary folder left
    again = save(tmp_path, 7, 3.0)  # the same step saved again replaces it whole
    assert torch.equal(checkpoint.load_weights(again)["w"], torch.full((4,), 3.0))


DAMAGE = {"missing file": "optimizer.safetensors is missing",
          "flipped byte": "model.safetensors is damaged (size or checksum differs from the manifest)",
          "grown": "state.json is damaged (size or checksum differs from the manifest)",
          "no manifest": "no manifest.json (the save did not finish)",
          "manifest not json": "unreadable manifest.json (JSONDecodeError: ",
          "manifest list": "unreadable manifest.json (AttributeError: 'list' object has no attribute 'items')",
          "unlisted required": "manifest.json does not list rng.safetensors, state.json",
          "path outside": "../escape is missing", "nested": "sub/extra is missing", "hidden": ".extra is missing"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_kind_of_damage_is_caught(damage, tmp_path):
    path = save(tmp_path, 1)
    manifest = path / "manifest.json"
    if damage == "missing file":
        (path / "optimizer.safetensors").unlink()
    elif damage == "flipped byte":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (path / "model.safetensors").write_bytes(bytes(data))
    elif damage == "grown":
        with (path / "state.json").open("a") as f:
            f.write(" ")
    elif damage == "no manifest":
        manifest.unlink()
    elif damage == "manifest not json":
        manifest.write_text("{")
    elif damage == "manifest list":
        manifest.write_text(json.dumps({"step": 1, "files": []}))
    elif damage == "unlisted required":
        listed = json.loads(manifest.read_text())
        del listed["files"]["rng.safetensors"], listed["files"]["state.json"]
        manifest.write_text(json.dumps(listed))
    elif damage == "path outside":
        listed = json.loads(manifest.read_text())
        listed["files"]["../escape"] = {"size": 0, "sha256": "0" * 64}
        manifest.write_text(json.dumps(listed))
    else:  # a file that is there and matches, but is not a checkpoint's own top-level file
        name = "sub/extra" if damage == "nested" else ".extra"
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_bytes(b"x")
        listed = json.loads(manifest.read_text())
        listed["files"][name] = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
        manifest.write_text(json.dumps(listed))
    with pytest.raises(CheckpointError) as err:
        checkpoint.verify(path)
    assert str(err.value).startswith(f"{path}: {DAMAGE[damage]}")
    with pytest.raises(CheckpointError):
        checkpoint.load_weights(path)


def test_resume_discovery_retention_and_the_best_intact_checkpoint(tmp_path, caplog):
    assert checkpoint.listing(tmp_path) == [] and checkpoint.find_resume(tmp_path, "latest") is None
    with pytest.raises(CheckpointError, match=r"--resume '/x' does not exist; checkpoints in .*: none$"):
        checkpoint.find_resume(tmp_path, "/x")
    paths = [save(tmp_path, step) for step in (5, 10, 999999, 1000000)]
    (tmp_path / "checkpoints" / "step-12").mkdir()  # not a checkpoint name: ignored
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert checkpoint.listing(tmp_path) == paths  # by step number, not by name or time
    assert checkpoint.find_resume(tmp_path, "latest") == paths[-1]
    assert checkpoint.find_resume(tmp_path, str(paths[1])) == paths[1]
    with pytest.raises(CheckpointError, match="does not exist; checkpoints in .*: step-000005, step-000010"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "nope"))
    (paths[-1] / "manifest.json").unlink()
    assert checkpoint.find_resume(tmp_path, "latest") == paths[-2]
    assert "skipping damaged checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="the save did not finish"):
        checkpoint.find_resume(tmp_path, str(paths[-1]))
    # retention: the newest `keep_last` complete ones and the best; a foreign stale temp folder goes too
    stale = tmp_path / "checkpoints" / ".tmp-step-000009-1"
    stale.mkdir()
    assert checkpoint.prune(tmp_path, keep_last=5, keep=set()) == [] and len(checkpoint.listing(tmp_path)) == 4
    gone = checkpoint.prune(tmp_path, keep_last=1, keep={"step-000005"})
    assert gone == [paths[1]] and [p.name for p in checkpoint.listing(tmp_path)] == [
        "step-000005", "step-999999", "step-1000000"] and not stale.exists()
    # best intact: by the metric over end-of-epoch checkpoints, the named damaged one skipped
    history = [EpochRow.from_json(r) for r in ({"epoch": 1, "step": 5, "val_loss": 0.5},
                                               {"epoch": 2, "step": 999999, "val_loss": 0.3},
                                               {"epoch": 3, "step": 7, "val_loss": 0.1})]
    found = checkpoint.best_intact(tmp_path, history, "val_loss", False, set())
    assert found == (paths[2], history[1])
    assert checkpoint.best_intact(tmp_path, history, "val_loss", True, set()) == (paths[0], history[0])
    assert checkpoint.best_intact(tmp_path, history, "val_loss", False, {"step-999999"}) == (paths[0], history[0])
    tie = [replace(history[0], val=replace(history[0].val, loss=0.3)), history[1]]  # equal metric: the earlier
    # epoch, as update_best keeps it
    assert checkpoint.best_intact(tmp_path, tie, "val_loss", False, set()) == (paths[0], tie[0])
    (paths[2] / "state.json").write_text("{}")
    caplog.clear()
    assert checkpoint.best_intact(tmp_path, history, "val_loss", False, set()) == (paths[0], history[0])
    assert caplog.records[0].getMessage().startswith("checkpoint step-999999 cannot be exported either: ")
    assert checkpoint.best_intact(tmp_path, history[2:], "val_loss", False, set()) is None


def test_ema_weights_are_saved_beside_the_model_and_merged_on_load(tmp_path):
    ranks = [({}, {"torch": torch.tensor([1])})]
    path = checkpoint.write(tmp_path, 3, {"a": torch.zeros(2), "b": torch.ones(2)}, {}, {}, ranks, {},
                            ema_state={"b": torch.full((2,), 0.5)})
    assert checkpoint.load_weights(path).keys() == {"a", "b"} and torch.equal(checkpoint.load_weights(path)["b"],
                                                                             torch.ones(2))
    merged = checkpoint.load_weights(path, ema=True)
    assert torch.equal(merged["a"], torch.zeros(2)) and torch.equal(merged["b"], torch.full((2,), 0.5))
    plain = save(tmp_path, 4)
    with pytest.raises(CheckpointError, match="no ema.safetensors; it was saved without --model-ema"):
        checkpoint.load_weights(plain, ema=True)


def test_the_better_of_the_model_and_its_ema_is_the_best():
    cfg = TrainConfig(metric="val_loss")
    state = RunState()
    cfg = BestPolicy.from_config(cfg)
    row = EpochRow.from_json({"epoch": 1, "step": 5, "val_loss": 0.5, "val_f1": 0.4,
                              "ema": {"val_loss": 0.4, "val_f1": 0.6}})
    assert update_best(state, row, cfg)
    assert state.best.weights == "ema" and state.best.metrics.loss == 0.4 and state.best.metrics.f1 == 0.6
    tie = EpochRow.from_json({"epoch": 2, "step": 10, "val_loss": 0.3, "ema": {"val_loss": 0.3}})
    assert update_best(state, tie, cfg) and state.best.weights == "model"  # equal: the training weights
    assert not update_best(state, EpochRow.from_json({"epoch": 3, "step": 15, "val_loss": 0.35,
                                                      "ema": {"val_loss": 0.31}}), cfg)
    assert state.bad_evals == 1


def test_nested_state_round_trips_through_json_and_safetensors():
    state = {"a": torch.arange(3), "b": [torch.zeros(2), {"c": 1.5, 2: torch.ones(1)}], "d": (1, "x"), "e": None}
    tensors: dict[str, torch.Tensor] = {}
    meta = checkpoint.split_tensors(state, "", tensors)
    assert sorted(tensors) == ["a", "b.0", "b.1.2"] and json.loads(json.dumps(meta)) == meta
    back = checkpoint.join_tensors(json.loads(json.dumps(meta)), tensors)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"][1]["2"], torch.ones(1))
    assert back["b"][1]["c"] == 1.5 and back["d"] == [1, "x"] and back["e"] is None
    assert checkpoint.split_tensors(torch.ones(1), "", {}) == {"__tensor__": "value"}
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(2)
    opt.step()
    meta, tensors = checkpoint.optimizer_state(opt)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.5)
    checkpoint.load_optimizer_state(fresh, json.loads(json.dumps(meta)), tensors)
    assert fresh.param_groups[0]["lr"] == 0.1 and torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"],
                                                                opt.state[param]["exp_avg"])


def test_the_rng_streams_are_saved_and_restored_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    meta, tensors = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(json.loads(json.dumps(meta)), tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---- best, early stopping, resume checks -------------------------------------------------------------------------

def rows(metric: str, values: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "step": 10 * (i + 1), metric: v} for i, v in enumerate(values)]


@pytest.mark.parametrize("metric, values, delta, patience, best, stopped", [
    ("val_accuracy", [0.5, 0.6, 0.6, 0.59], 0.0, 2, 2, 4),  # equal is no improvement
    ("val_accuracy", [0.5, 0.55, 0.7], 0.1, 2, 3, None),  # +0.05 is within min_delta: a bad evaluation, not two
    ("val_accuracy", [0.5, 0.6], 0.1, 1, 1, 2),  # exactly min_delta is not more than it
    ("val_loss", [1.0, 0.9, 0.95, 0.8], 0.0, 3, 4, None),  # lower is better
    ("val_loss", [1.0, 1.1, 1.2, 1.3], 0.0, 3, 1, 4),
    ("val_f1", [0.2, 0.1, 0.3], 0.0, None, 3, None),  # no patience: never stops
])
def test_best_and_early_stopping(metric, values, delta, patience, best, stopped):
    cfg = TrainConfig(metric=metric, early_stopping_min_delta=delta, early_stopping_patience=patience)
    state = RunState()
    improvements = [update_best(state, EpochRow.from_json(row), BestPolicy.from_config(cfg))
                    for row in rows(metric, values) if state.stopped is None]
    assert improvements[0] is True and state.best.epoch == best
    assert state.best.metrics.score(metric) == values[best - 1]
    if stopped is None:
        assert state.stopped is None
    else:
        assert state.stopped.reason == "early_stopping" and state.stopped.epoch == stopped
        assert state.stopped.step == 10 * stopped and f"for {patience} evaluation(s)" in state.stopped.detail
        assert state.bad_evals == patience


def test_resume_refuses_every_change_that_makes_another_run():
    cfg = TrainConfig()
    saved = {"config": cfg.to_dict(), "run": {"dataset_revision": "a", "model_revision": "m", "class_names": ["x"],
                                              "val_source": "hash:0.1", "num_processes": 1}}
    run = dict(saved["run"])
    assert resume_differences(saved, cfg, run) == []
    for field, value in (("model", "other"), ("batch_size", 7), ("drop_rate", 0.2), ("seed", 1), ("freeze", "stem")):
        changed = TrainConfig(**{**cfg.to_dict(), field: value})
        flag = field.replace("_", "-")
        old = repr(getattr(cfg, field))
        assert resume_differences(saved, changed, run) == [
            f"--{flag}: checkpoint has {old}, this run has {value!r}"]
    for key, what in (("dataset_revision", "dataset revision"), ("model_revision", "base model revision"),
                      ("class_names", "classes"), ("val_source", "validation split"),
                      ("num_processes", "number of processes")):
        assert resume_differences(saved, cfg, {**run, key: "z"}) == [
            f"{what}: checkpoint has {saved['run'][key]!r}, this run has 'z'"]
    custom = TrainConfig(batch_size=7, seed=3)  # saved non-default values, the same in this run
    assert resume_differences({**saved, "config": custom.to_dict()}, custom, run) == []
    older = {"config": {k: v for k, v in saved["config"].items() if k != "drop_rate"}, "run": {}}
    assert resume_differences(older, cfg, run) == []  # a field it lacks had its default; an unrecorded run key
    assert resume_differences(older, TrainConfig(drop_rate=0.1), run) == [
        "--drop-rate: checkpoint has 0.0, this run has 0.1"]
    assert cfg.lr != 1.0 and resume_differences(saved, TrainConfig(lr=1.0), run) == []  # the lr may change


def test_progress_and_state_round_trip():
    progress = EpochProgress()
    progress.add(0.5, 4)
    progress.add(1.0, 2)
    progress.advance({"loader": {"pos": 3}, "bad": 1, "seen": 7})
    assert progress.to_dict() == {"loss_sum": 4.0, "n": 6, "bad": 1, "seen": 7, "loader": {"pos": 3}}
    assert EpochProgress.from_dict({**progress.to_dict(), "extra": 1}).to_dict() == progress.to_dict()
    state = RunState(epoch=2, global_step=30, elapsed_s=1.5, segments=2)
    assert RunState.from_dict({**state.to_dict(), "unknown": 1}) == state


# ---- the split and its keys --------------------------------------------------------------------------------------

def test_content_keys_are_fixed_and_the_cutoff_is_exact():
    assert stream.content_key(b"hubtune") == 6045480506797819193  # blake2b, 8 bytes, person "hubtune-val"
    assert stream.content_key(b"") != stream.content_key(b"\0")
    assert stream.in_val(0, 0.1) and not stream.in_val(2**64 - 1, 0.999)
    cut = int(0.1 * 2**64)
    assert stream.in_val(cut - 10**4, 0.1) and not stream.in_val(cut + 10**4, 0.1)
    assert stream.in_val(2**63 - 2**11, 0.5) and not stream.in_val(2**63, 0.5)  # the cut-off itself is outside


# ---- the push helpers --------------------------------------------------------------------------------------------

def http_error(status: int) -> HfHubHTTPError:
    return HfHubHTTPError(f"{status} answer", response=httpx2.Response(status, request=httpx2.Request("GET", "http://h/x")))


@pytest.mark.parametrize("err, reason", [
    (http_error(500), "HTTP 500"), (http_error(503), "HTTP 503"), (http_error(408), "HTTP 408"),
    (http_error(429), "HTTP 429"), (http_error(400), None), (http_error(403), None), (http_error(499), None),
    (httpx2.ConnectError("refused"), "ConnectError: refused"), (TimeoutError(), "TimeoutError: no answer"),
    (ValueError("x"), None),
])
def test_transient_failures_are_told_from_answers(err, reason):
    assert hub_calls.transient_reason(err) == reason
    wrapped = RuntimeError("Error while uploading 'model.safetensors' to the Hub.")
    wrapped.__cause__ = err
    assert hub_calls.transient_reason(wrapped) == reason  # what huggingface_hub raises around an LFS upload
    assert hub_calls.status_of(wrapped) == getattr(getattr(err, "response", None), "status_code", None)


def test_causes_follow_the_chain_once_even_in_a_cycle():
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__context__ = b, a
    assert list(hub_calls.causes(a)) == [a, b]
    plain = httpx2.HTTPStatusError("500", request=httpx2.Request("GET", "http://h"),
                                   response=httpx2.Response(500, request=httpx2.Request("GET", "http://h")))
    assert hub_calls.status_of(plain) is None and hub_calls.transient_reason(plain) is None  # not the Hub's answer


def test_retrying_retries_only_transient_failures_with_backoff(caplog):
    calls = []

    def flaky(failures: list[BaseException]):
        def fn():
            calls.append(1)
            if failures:
                raise failures.pop(0)
            return "ok"
        return fn

    started = time.monotonic()
    assert hub_calls.retrying("op", flaky([http_error(503), httpx2.ReadError("x")]), 2, 0.05) == "ok"
    assert time.monotonic() - started >= 0.15  # waited 0.05 s, then 0.1 s
    assert len(calls) == 3 and [r.getMessage() for r in caplog.records] == [
        "op failed (HTTP 503); retrying in 0.05s (1/2)", "op failed (ReadError: x); retrying in 0.1s (2/2)"]
    calls.clear()
    waiting = threading.Event()  # given, never set: the waits still happen
    started = time.monotonic()
    assert hub_calls.retrying("op", flaky([http_error(503)]), 3, 0.05, waiting) == "ok"
    assert time.monotonic() - started >= 0.05 and len(calls) == 2
    calls.clear()
    with pytest.raises(HfHubHTTPError) as err:
        hub_calls.retrying("op", flaky([http_error(500)] * 5), 2, 0.0)
    assert len(calls) == 3 and hub_calls.attempts_of(err.value) == 3
    calls.clear()
    with pytest.raises(HfHubHTTPError) as err:
        hub_calls.retrying("op", flaky([http_error(404), http_error(500)]), 2, 0.0)
    assert len(calls) == 1 and hub_calls.attempts_of(err.value) == 1
    assert hub_calls.attempts_of(ValueError()) == 1
    cancel = threading.Event()
    cancel.set()
    calls.clear()
    with pytest.raises(HfHubHTTPError):
        hub_calls.retrying("op", flaky([http_error(500)] * 3), 2, 10.0, cancel)
    assert len(calls) == 1  # cancelled: no wait, no further attempt


def test_push_failures_say_what_failed_how_often_and_the_fix(tmp_path):
    err = http_error(503)
    err.hubtune_attempts = 5
    assert hub.push_failure(err, "a/b", "upload", tmp_path) == (
        f"push to a/b failed at upload after 5 attempts (HTTP 503); nothing in {tmp_path} was changed; run the same "
        "push again to complete it")
    assert hub.push_failure(http_error(401), "a/b", "upload") == (
        "push to a/b refused (401): set HF_TOKEN or run `hf auth login`; run it again to complete it")
    assert "refused (403): your token cannot write to 'a'" in hub.push_failure(http_error(403), "a/b", "x")
    assert "repo not found or not yours" in hub.push_failure(http_error(404), "a/b", "x")
    assert "failed at commit at the first attempt (HTTP 400: 400 answer)" in hub.push_failure(http_error(400), "a/b",
                                                                                                   "commit")
    twice = http_error(500)
    twice.hubtune_attempts = 2
    assert "failed at x after 2 attempts (HTTP 500)" in hub.push_failure(twice, "a/b", "x")
    wrapped = RuntimeError("Error while uploading 'w' to the Hub.")
    wrapped.__cause__ = http_error(400)
    assert "failed at upload at the first attempt (HTTP 400: 400 answer)" in hub.push_failure(wrapped, "a/b", "upload")
    assert hub.push_failure(KeyError("bug"), "a/b", "x") is None
    assert hub.push_failure(RepositoryNotFoundError("gone", response=http_error(404).response), "a/b", "x")


def test_verification_compares_size_and_hash_of_every_file(tmp_path):
    blob, big = b"hello", b"x" * 100
    (tmp_path / "w.bin").write_bytes(big)

    def entry(size: int, blob_id: str | None = None, sha256: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(size=size, blob_id=blob_id, lfs=SimpleNamespace(sha256=sha256) if sha256 else None)

    good = {"a.txt": entry(5, hashlib.sha1(b"blob 5\0hello").hexdigest()),
            "w.bin": entry(100, "x", hashlib.sha256(big).hexdigest())}
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    # what was uploaded: the operations of the commit, which hashed each file to upload it
    contents = [CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=blob),
                CommitOperationAdd(path_in_repo="w.bin", path_or_fileobj=str(tmp_path / "w.bin")),
                CommitOperationDelete(path_in_repo="gone.bin")]
    hub._verify("r/x", "c" * 40, contents, good)
    rerun = "; nothing local was changed; run the same push again"
    for name, bad, why in (("a.txt", None, "is not in r/x@cccccccc"),
                           ("a.txt", entry(6, "y"), "is 6 bytes on r/x@cccccccc, 5 here"),
                           ("a.txt", entry(5, "0" * 40), "on r/x@cccccccc differs from the local file"),
                           ("w.bin", entry(100, "x", "0" * 64), "on r/x@cccccccc differs from the local file")):
        remote = {**good, name: bad} if bad else {k: v for k, v in good.items() if k != name}
        with pytest.raises(PushError) as err:
            hub._verify("r/x", "c" * 40, contents, remote)
        assert str(err.value) == f"verification failed: {name} {why}{rerun}"


def test_the_card_marker_tells_a_generated_card_from_an_edited_one(tmp_path):
    marked = hub.mark_card("# card  \n\n\n")
    digest = hashlib.sha256(b"# card  \n").hexdigest()
    assert marked == f"# card  \n\n{hub.CARD_MARKER}{digest} -->\n"
    assert not hub.card_was_edited(marked) and hub.mark_card(marked) == marked
    assert hub.card_was_edited(marked.replace("# card", "# mine")) and hub.card_was_edited("# card\n")
    assert hub.card_was_edited(marked + "## My section\n")  # appended after the marker is an edit too
    assert hub.card_was_edited(marked.replace(" -->", "-->"))
    assert hub.card_was_edited("# card\n\n") and hub.mark_card("# cardX\n") != hub.mark_card("# card\n")
    assert hub.mark_card("X# cardX").startswith("X# cardX\n\n")  # only newlines are stripped
    for name in ("config.json", "model.safetensors", "README.md", "plots/a.png", "runs/hubtune/events.out.x",
                 "checkpoints/step-000001/x",
                 "checkpoints/.tmp-step-1/x", "checkpoints/step-000001/.tmp-y", "notes.txt", "metrics.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert hub.files_to_push(tmp_path) == ["README.md", "config.json", "metrics.json", "model.safetensors",
                                           "plots/a.png", "runs/hubtune/events.out.x"]
    assert hub.files_to_push(tmp_path, push_checkpoints=True)[-1] == "runs/hubtune/events.out.x"
    assert [f for f in hub.files_to_push(tmp_path, push_checkpoints=True) if "checkpoints" in f] == [
        "checkpoints/step-000001/x"]


# ---- config validation -------------------------------------------------------------------------------------------

def test_every_range_is_checked_at_both_ends():
    for name, most in UPPER_BOUNDS.items():
        least = 0 if name in ("warmup_steps", "num_workers") else 1
        assert TrainConfig(**{name: least}).problems() == [] and TrainConfig(**{name: most}).problems() == []
        assert TrainConfig(**{name: least - 1}).problems() == [f"--{name.replace('_', '-')}: got {least - 1}, "
                                                              f"expected an integer >= {least}"]
        assert TrainConfig(**{name: most + 1}).problems() == [
            f"--{name.replace('_', '-')}: got {most + 1}, expected an integer from {least} to {most:,} (larger "
            "values exhaust the machine)"]
    accepted = {"val_fraction": "a number strictly between 0 and 1", "max_bad_fraction": "a number between 0 and 1",
                "lr": "a positive number", "weight_decay": "a number >= 0", "layer_decay": "a number in (0, 1]",
                "clip_grad": "a positive number", "drop_rate": "a number from 0 up to (not including) 1",
                "drop_path_rate": "a number from 0 up to (not including) 1",
                "early_stopping_min_delta": "a number >= 0", "early_stopping_patience": "an integer >= 1",
                "keep_last": "an integer >= 1", "save_every": "'epoch' or a positive number of optimizer steps",
                "model": "a timm model name, Hub id or local-dir:PATH", "dataset": "a Hub dataset id or a local path",
                "mixed_precision": "one of no, bf16, fp16",
                "optimizer": "one of adamw, adam, sgd, momentum, lamb, lion, adan, rmsprop",
                "metric": "one of val_accuracy, val_loss, val_f1",
                "compile_backend": "one of inductor, cudagraphs, aot_eager, eager"}
    bad = {"val_fraction": (0.0, 1.0), "max_bad_fraction": (-0.1, 1.1), "lr": (0.0, float("nan")),
           "weight_decay": (-1.0,), "layer_decay": (0.0, 1.5), "clip_grad": (0.0,), "drop_rate": (-0.1, 1.0),
           "drop_path_rate": (1.0,), "early_stopping_min_delta": (-1.0,), "early_stopping_patience": (0,),
           "keep_last": (0,), "save_every": ("0", "x", "-1"), "model": (" ",), "dataset": ("",),
           "mixed_precision": ("fp8",), "optimizer": ("nope",), "metric": ("acc",), "compile_backend": ("x",)}
    for name, values in bad.items():
        for value in values:
            assert TrainConfig(**{name: value}).problems() == [
                f"--{name.replace('_', '-')}: got {value!r}, expected {accepted[name]}"], (name, value)
    good = {"val_fraction": 0.999, "max_bad_fraction": 0.0, "layer_decay": 1.0, "drop_rate": 0.0, "save_every": "1",
            "early_stopping_min_delta": 0.0, "clip_grad": 0.1, "weight_decay": 0.0, "keep_last": 1,
            "early_stopping_patience": 1}
    assert TrainConfig(**good).problems() == [] and TrainConfig(max_bad_fraction=1.0).problems() == []
    with pytest.raises(ConfigError) as err:
        TrainConfig(epochs=0, keep_last=0).validate()
    assert str(err.value) == ("invalid configuration (2 problems):\n  --epochs: got 0, expected an integer >= 1\n"
                              "  --keep-last: got 0, expected an integer >= 1")
    with pytest.raises(ConfigError, match="invalid configuration: --epochs: got 0"):
        TrainConfig(epochs=0).validate()
    assert TrainConfig(save_every="epoch").save_steps is None and TrainConfig(save_every="7").save_steps == 7
    assert TrainConfig(metric="val_loss").higher_is_better is False and TrainConfig().higher_is_better is True
