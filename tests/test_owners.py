"""Each piece of knowledge that used to be written in several places has one owner; these pin its decisions.

Fast (no model, no server): the local-path-or-Hub-id rule, checkpoint folder names, the bad-image limit, the Hub
error translations, what a push holds, and the CLI defaults of `hubtune evaluate`.
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from hubtune import checkpoint, hub
from hubtune.errors import BadDataError, ModelSourceError, PushError, check_bad_fraction
from hubtune.files import CHECKPOINTS_DIR, STEP_GLOB, TMP_PREFIX, newest_first, step_name, step_of
from hubtune.sources import is_commit, is_hub_id, is_local, parse_model_spec


def _answer(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "http://h/x"))


@pytest.mark.parametrize("source", ["./run", "../run", "/abs/run", "~/run", "\\\\share\\run", Path("org/name")])
def test_what_is_written_as_a_path_is_local_whether_or_not_it_exists(source):
    assert is_local(source)


def test_an_existing_file_or_folder_is_local_even_when_shaped_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "data.parquet").write_bytes(b"")
    assert is_local("org/name") and is_local("org/data.parquet")
    assert parse_model_spec("org/name").kind == "local"


@pytest.mark.parametrize("source", ["org/name", "timm/resnet50.a1_in1k", "resnet50", "org/name@v1", ""])
def test_anything_else_is_for_the_caller_to_read_as_a_hub_id(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_local(source)


def test_a_hub_id_is_org_slash_name_and_not_local_and_a_commit_is_a_full_sha(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and not is_hub_id("name") and not is_hub_id("org/name/extra")
    assert not is_hub_id("./org/name") and not is_hub_id(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # a folder here wins, as is_local says
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert is_commit(sha) and not is_commit(sha[:12]) and not is_commit("main") and not is_commit(None)
    assert not is_commit(sha.upper())


def test_defaults_named_in_two_places_come_from_one(tmp_path):
    from hubtune.config import TrainConfig
    from hubtune.errors import MAX_BAD_FRACTION
    from hubtune.evaluation import EvalRequest
    from hubtune.files import CHECKPOINTS_BRANCH

    assert TrainConfig().max_bad_fraction == EvalRequest.__dataclass_fields__["max_bad_fraction"].default
    assert TrainConfig().max_bad_fraction == MAX_BAD_FRACTION
    assert TrainConfig().hub_checkpoints_branch == CHECKPOINTS_BRANCH


def test_checkpoint_folder_names_are_made_read_and_listed_by_one_owner(tmp_path):
    names = [step_name(s) for s in (3, 120, 1_000_000)]
    assert names[:2] == ["step-000003", "step-000120"]
    assert [step_of(n) for n in names] == [3, 120, 1_000_000]
    assert all(fnmatch.fnmatch(n, STEP_GLOB) for n in names)
    assert step_of("step-12") is None and step_of(f"{TMP_PREFIX}{names[0]}-7") is None
    assert newest_first(["x", *names]) == names[::-1]
    assert checkpoint.step_dir(tmp_path, 3) == tmp_path / CHECKPOINTS_DIR / names[0]
    from hubtune.hub_checkpoints import HF_URL

    match = HF_URL.match(f"hf://org/name@ckpt/{CHECKPOINTS_DIR}/{names[1]}")
    assert match is not None and match["name"] == names[1] and match["branch"] == "ckpt"
    assert HF_URL.match(f"hf://org/name/{CHECKPOINTS_DIR}/step-12") is None


def test_the_bad_image_limit_is_one_rule_for_training_and_evaluation():
    check_bad_fraction(1, 100, 0.01, "training")  # at the limit: allowed
    check_bad_fraction(0, 0, 0.0, "evaluation")  # nothing seen: nothing to judge
    with pytest.raises(BadDataError, match=r"^2 of 100 evaluation images \(2\.0%\) could not be decoded, over "
                                           r"--max-bad-fraction 0\.01; fix the data or raise the limit$"):
        check_bad_fraction(2, 100, 0.01, "evaluation")


def test_a_failed_hub_call_becomes_one_push_error_and_anything_else_keeps_its_traceback(tmp_path):
    with pytest.raises(PushError, match=r"^push to a/b refused \(401\): set HF_TOKEN") as info:
        with hub.push_errors("a/b", "reading the card"):
            raise HfHubHTTPError("401 answer", response=_answer(401))
    assert isinstance(info.value.__cause__, HfHubHTTPError)
    with pytest.raises(PushError, match=r"failed at step two at the first attempt \(HTTP 503\).*in " + str(tmp_path)):
        with hub.push_errors("a/b", lambda: "step two", tmp_path):
            raise HfHubHTTPError("503 answer", response=_answer(503))
    with pytest.raises(KeyError):
        with hub.push_errors("a/b", "x"):
            raise KeyError("a bug")
    with pytest.raises(PushError, match="^as it was$"):
        with hub.push_errors("a/b", "x"):
            raise PushError("as it was")


@pytest.mark.parametrize(("error", "message"), [
    (GatedRepoError, r"^--model 'org/name@v1': http\S+/org/name is gated: accept its licence there, then set HF_TOKEN"),
    (RevisionNotFoundError, r"^--model 'org/name@v1': http\S+/org/name has no revision 'v1'; give an existing branch"),
    (RepositoryNotFoundError, r"^--model 'org/name@v1': no such model repo on the Hub \(model repo 'org/name' not "
                              r"found at http\S+/org/name; private\? set HF_TOKEN"),
])
def test_the_hubs_typed_errors_about_a_model_repo_read_the_same_for_training_and_loading(error, message):
    with pytest.raises(ModelSourceError, match=message):
        with hub.model_repo_errors("org/name@v1"):
            raise error("no", response=_answer(404))
    spec = parse_model_spec("org/name", "v1")
    with pytest.raises(ModelSourceError, match=message.replace("--model 'org/name@v1'", "org/name@v1")):
        with hub.model_repo_errors(spec, what="org/name@v1"):
            raise error("no", response=_answer(404))


def test_a_push_holds_the_export_its_plots_and_curves_and_nothing_half_written(tmp_path):
    for name in ["config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml",
                 "plots/confusion_matrix.png", "plots/notes.txt", "runs/hubtune/events.tfevents.1",
                 f"{CHECKPOINTS_DIR}/{step_name(4)}/model.safetensors", f"plots/{TMP_PREFIX}x.png", "other.bin"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    plain = hub.files_to_push(tmp_path)
    assert plain == sorted(["config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml",
                            "plots/confusion_matrix.png", "runs/hubtune/events.tfevents.1"])
    assert hub.files_to_push(tmp_path, push_checkpoints=True) == sorted(
        plain + [f"{CHECKPOINTS_DIR}/{step_name(4)}/model.safetensors"])


def test_a_push_target_is_one_record_and_background_pushes_retry_less(tmp_path, monkeypatch):
    target = hub.PushTarget("org/name", revision="dev", private=True, commit_message="m", overwrite_card=True)
    assert (target.retries, target.retry_wait, target.token, target.endpoint) == (4, 2.0, None, None)
    with pytest.raises(AttributeError):
        target.retries = 0  # type: ignore[misc]
    pushed = []
    monkeypatch.setattr(hub, "push", lambda folder, to, cancel: pushed.append((folder, to)) or "url")
    pusher = hub.export_pusher(target)
    snapshot = hub.snapshot_dir(tmp_path)
    pusher.submit(snapshot)
    assert pusher.close(timeout=10, drain=True)
    assert pushed == [(snapshot, hub.PushTarget("org/name", revision="dev", private=True, commit_message="m",
                                                overwrite_card=True, retries=hub.BACKGROUND_RETRIES))]
    assert hub.BACKGROUND_RETRIES == 2 and not snapshot.exists()  # the snapshot is deleted after its push


def test_the_evaluate_command_builds_a_typed_request_with_the_records_defaults():
    from hubtune.evaluation import EvalRequest, add_evaluate_arguments

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = vars(parser.parse_args(["org/model", "--dataset", "org/data"]))
    request = EvalRequest("org/model", "org/data")
    for name in ("revision", "split", "dataset_revision", "image_column", "label_column", "batch_size", "num_workers",
                 "max_bad_fraction", "output_dir", "tta", "push", "trust_pickled_weights"):
        assert args[name] == getattr(request, name), name


def test_run_folder_names_come_from_files_and_listing_a_push_does_not_import_matplotlib(tmp_path):
    import subprocess
    import sys

    from hubtune import files, hub_checkpoints, plots

    assert plots.PLOTS_DIR is files.PLOTS_DIR and plots.CONFUSION_MATRIX.startswith(f"{files.PLOTS_DIR}/")
    assert checkpoint.step_dir(tmp_path, 7) == tmp_path / files.CHECKPOINTS_DIR / step_name(7)
    assert hub_checkpoints.HF_URL.match(f"hf://org/name/{files.CHECKPOINTS_DIR}/{step_name(3)}")
    (tmp_path / files.PLOTS_DIR).mkdir()
    (tmp_path / plots.CONFUSION_MATRIX).write_bytes(b"png")
    code = ("import sys, pathlib, hubtune.hub as h; "
            f"assert {plots.CONFUSION_MATRIX!r} in h.files_to_push(pathlib.Path({str(tmp_path)!r})); "
            "assert 'matplotlib' not in sys.modules, 'listing a push imported matplotlib'")
    subprocess.run([sys.executable, "-c", code], check=True)
