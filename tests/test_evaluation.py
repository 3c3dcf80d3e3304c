"""The other researcher's side: loading an export in transformers, `hubtune evaluate` on their own labelled data
(labels matched by name, several processes, --push to the card, a local folder evaluated whole, an earlier
evaluation kept), and `hubtune predict` on whole directories."""

import argparse
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
import pytest
import timm
import torch
from helpers import make_image_dataset, make_rgb
from huggingface_hub import HfApi, ModelCard

from hubtune import ImageClassifier
from hubtune import hub as hub_lib
from hubtune.config import TrainConfig
from hubtune.errors import DataError, PushError
from hubtune.evaluation import EVAL_FILES, RESULTS_FILE, add_evaluate_arguments, run_evaluate
from hubtune.predict import add_predict_arguments, run_predict
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-alice-write"


@pytest.fixture(scope="module")
def export(two_class_folder, tmp_path_factory) -> Path:
    """A hubtune export (cat/dog), without its checkpoints."""
    out = tmp_path_factory.mktemp("export")
    train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(two_class_folder), image_size=32, epochs=2,
                      batch_size=16, lr=3e-3, num_workers=0, max_bad_fraction=0.05, output_dir=str(out),
                      progress=False))
    shutil.rmtree(out / "checkpoints")
    return out


@pytest.fixture(scope="module")
def renamed_test_set(tmp_path_factory) -> Path:
    """A `test` split whose classes are called kitty and puppy, with 3 broken files among 29 images."""
    root = tmp_path_factory.mktemp("theirs")
    make_image_dataset(root / "test", "imagefolder", per_class=10, seed=7, bad=True)
    (root / "test" / "cat").rename(root / "test" / "kitty")
    (root / "test" / "dog").rename(root / "test" / "puppy")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A newcomer's labelled photos: one subfolder per class (cat/, dog/), no train/ or test/ folders; 16 images."""
    return make_image_dataset(tmp_path_factory.mktemp("photos"), "imagefolder", per_class=5, seed=3)


def hubtune(*argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`hubtune ...` as a user types it, in `cwd` (where the default --output-dir, ./evaluation, goes)."""
    return subprocess.run([sys.executable, "-m", "hubtune.cli", *argv], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env})


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `hubtune: error: ...` line a refused command ends with (exit code 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def evaluate(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(list(argv))
    assert run_evaluate(args) == 0
    return json.loads((Path(args.output_dir) / RESULTS_FILE).read_text())


@pytest.mark.slow
def test_exports_load_in_transformers_exactly_as_in_timm(hub, export, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    repo_id = f"alice/tf-{uuid.uuid4().hex[:8]}"
    commit = hub_lib.push(export, hub_lib.PushTarget(repo_id, token=TOKEN)).rsplit("/", 1)[1]
    reference = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    image = tmp_path / "dog.png"
    make_rgb(1, random.Random(11)).resize((50, 38)).save(image)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    with torch.no_grad():
        timm_probs = reference(transform(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]
    x = torch.randn(3, 3, 32, 32)
    for source in (str(export), repo_id):
        kwargs = {"revision": commit} if source == repo_id else {}
        model = AutoModelForImageClassification.from_pretrained(source, **kwargs).eval()
        assert model.config.id2label == {0: "cat", 1: "dog"}
        with torch.no_grad():
            assert (model(x).logits - reference(x)).abs().max() < 1e-5
        assert type(AutoImageProcessor.from_pretrained(source, **kwargs)).__name__ == "TimmWrapperImageProcessor"
        top = pipeline("image-classification", model=source, revision=kwargs.get("revision"))(str(image))[0]
        best = int(timm_probs.argmax())
        assert top["label"] == ["cat", "dog"][best] and abs(top["score"] - timm_probs[best].item()) < 1e-3


def test_exports_of_the_old_format_still_load_and_a_push_rewrites_their_config(hub, export, tmp_path):
    from transformers import AutoModelForImageClassification

    old = tmp_path / "old"
    shutil.copytree(export, old)
    config = json.loads((old / "config.json").read_text())
    config["model_args"]["num_classes"] = 2  # what hubtune wrote before (timm's save_for_hf)
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        AutoModelForImageClassification.from_pretrained(old)
    assert ImageClassifier.from_pretrained(old).label_names == ["cat", "dog"]
    assert timm.create_model(f"local-dir:{old}", pretrained=True).num_classes == 2
    repo_id = f"alice/migrated-{uuid.uuid4().hex[:8]}"
    hub_lib.push(old, hub_lib.PushTarget(repo_id, token=TOKEN))
    assert AutoModelForImageClassification.from_pretrained(repo_id).config.id2label == {0: "cat", 1: "dog"}
    assert json.loads((old / "config.json").read_text()) == config  # the local folder is left as it was


@pytest.mark.slow
def test_evaluate_matches_labels_by_name_skips_broken_images_and_refuses_unknown_labels(export, renamed_test_set,
                                                                                         tmp_path):
    with pytest.raises(DataError, match=r"dataset labels 'kitty', 'puppy' are not labels of the model; dataset labels:"
                                        r" \['kitty', 'puppy'\], model labels: \['cat', 'dog'\]; rename them with "
                                        r"--label-map"):
        evaluate(str(export), "--dataset", str(renamed_test_set), "--output-dir", str(tmp_path / "no"))
    with pytest.raises(DataError, match=r"--label-map renames \['tiger'\], which the dataset does not have"):
        evaluate(str(export), "--dataset", str(renamed_test_set), "--label-map", "tiger=cat", "--output-dir",
                 str(tmp_path / "no"))
    result = evaluate(str(export), "--dataset", str(renamed_test_set), "--label-map", "kitty=cat,puppy=dog",
                      "--max-bad-fraction", "0.2", "--num-workers", "0", "--output-dir", str(tmp_path / "out"))
    assert result["examples"] == 26 and result["skipped_images"] == 3
    assert result["dataset"]["split"] == "test" and result["dataset"]["label_map"] == {"kitty": "cat", "puppy": "dog"}
    assert [row["support"] for row in result["per_class"].values()] == [sum(r) for r in result["confusion_matrix"]]
    # the same images under the model's own label names give the same result, class by class
    same = tmp_path / "same"
    shutil.copytree(renamed_test_set, same)
    (same / "test" / "kitty").rename(same / "test" / "cat")
    (same / "test" / "puppy").rename(same / "test" / "dog")
    direct = evaluate(str(export), "--dataset", str(same), "--max-bad-fraction", "0.2", "--output-dir",
                      str(tmp_path / "direct"))
    assert direct["confusion_matrix"] == result["confusion_matrix"] and direct["metrics"] == result["metrics"]
    assert (tmp_path / "out" / "eval_confusion_matrix.png").stat().st_size > 1000
    # the bad-image rule of training applies
    from hubtune.errors import BadDataError

    with pytest.raises(BadDataError, match=r"3 of 29 evaluation images \(10.3%\) could not be decoded, over --max-bad-fraction 0.01"):
        evaluate(str(export), "--dataset", str(same), "--output-dir", str(tmp_path / "strict"))


@pytest.mark.slow
def test_two_processes_count_every_example_once(export, renamed_test_set, tmp_path):
    single = evaluate(str(export), "--dataset", str(renamed_test_set), "--label-map", "kitty=cat,puppy=dog",
                      "--max-bad-fraction", "0.2", "--output-dir", str(tmp_path / "one"))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hubtune.cli", "evaluate", str(export),
         "--dataset", str(renamed_test_set), "--label-map", "kitty=cat,puppy=dog", "--max-bad-fraction", "0.2",
         "--num-workers", "0", "--output-dir", str(tmp_path / "two")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads((tmp_path / "two" / RESULTS_FILE).read_text())
    assert double["num_processes"] == 2
    assert (double["examples"], double["skipped_images"]) == (single["examples"], single["skipped_images"]) == (26, 3)
    assert double["confusion_matrix"] == single["confusion_matrix"]
    assert "accuracy" in proc.stdout and proc.stdout.count("wrote ") == 1  # the main process reports, once


@pytest.mark.slow
def test_evaluate_push_adds_model_index_entries_and_keeps_the_card(hub, export, renamed_test_set, tmp_path,
                                                                   monkeypatch):
    repo_id = f"alice/evaluated-{uuid.uuid4().hex[:8]}"
    hub_lib.push(export, hub_lib.PushTarget(repo_id, token=TOKEN))
    before = ModelCard.load(repo_id)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for split_map in ("kitty=cat,puppy=dog", "puppy=cat,kitty=dog"):  # two results (the second one swaps labels)
        evaluate(repo_id, "--dataset", str(renamed_test_set), "--label-map", split_map, "--max-bad-fraction", "0.2",
                 "--output-dir", str(tmp_path / "out"), "--overwrite-output-dir", "--push")
    card = ModelCard.load(repo_id)
    results = card.data.eval_results
    assert results[:len(before.data.eval_results)] == before.data.eval_results  # the training results stay
    added = results[len(before.data.eval_results):]
    assert [(r.metric_type, r.dataset_split) for r in added] == [("accuracy", "test"), ("f1", "test"),
                                                                 ("ece", "test")] * 2
    assert added[0].metric_value + added[3].metric_value == pytest.approx(1.0, abs=1e-3)  # swapped labels
    assert "## How to use" in card.text and card.text == before.text
    monkeypatch.setenv("HF_TOKEN", "tok-alice-read")
    with pytest.raises(PushError, match=rf"push to {repo_id} refused \(403\): your token cannot write"):
        evaluate(repo_id, "--dataset", str(renamed_test_set), "--label-map", "kitty=cat,puppy=dog",
                 "--max-bad-fraction", "0.2", "--output-dir", str(tmp_path / "readonly"), "--push")
    assert (tmp_path / "readonly" / RESULTS_FILE).is_file()  # the result is kept even when the push is refused


@pytest.mark.slow
def test_a_local_folder_of_class_subfolders_is_evaluated_whole_and_a_hub_train_split_is_still_refused(
        hub, export, photos, tmp_path):
    proc = hubtune("evaluate", str(export), "--dataset", str(photos), "--num-workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == f"{export} on {photos} (train): 16 images, 0 skipped"
    assert (f"--dataset '{photos}' is local, with one split ('train') and no test or validation split: evaluating all "
            "of it") in proc.stderr.splitlines()
    folder = json.loads((tmp_path / "evaluation" / RESULTS_FILE).read_text())
    assert folder["examples"] == 16 and folder["dataset"]["split"] == "train"
    # the same images as a local parquet file: the same evaluation
    parquet = make_image_dataset(tmp_path / "parquet", "parquet", per_class=5, seed=3)
    from_parquet = evaluate(str(export), "--dataset", str(parquet), "--output-dir", str(tmp_path / "parquet_eval"))
    assert from_parquet["confusion_matrix"] == folder["confusion_matrix"]
    # a local folder with train/ and test/ subfolders is evaluated on test/, as before
    splits = tmp_path / "splits"
    shutil.copytree(photos, splits / "train")
    make_image_dataset(splits / "test", "imagefolder", per_class=3, seed=4)
    on_test = evaluate(str(export), "--dataset", str(splits), "--output-dir", str(tmp_path / "splits_eval"))
    assert on_test["dataset"]["split"] == "test" and on_test["examples"] == 12
    # on the Hub, a dataset with only a train split is training data: refused, as before
    repo_id = f"alice/photos-{uuid.uuid4().hex[:8]}"
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=photos)
    proc = hubtune("evaluate", str(export), "--dataset", repo_id, "--output-dir", "hub_eval", cwd=tmp_path)
    assert error_line(proc) == (f"hubtune: error: --dataset '{repo_id}' has no test or validation split; splits: train "
                                "(choose one with --split)")
    assert not (tmp_path / "hub_eval").exists()


@pytest.mark.slow
def test_a_second_evaluation_into_the_same_folder_is_refused_and_keeps_the_first_unless_asked(
        export, photos, renamed_test_set, tmp_path):
    first = evaluate(str(export), "--dataset", str(renamed_test_set), "--label-map", "kitty=cat,puppy=dog",
                     "--max-bad-fraction", "0.2", "--output-dir", str(tmp_path / "evaluation"))
    kept = {name: (tmp_path / "evaluation" / name).read_bytes() for name in EVAL_FILES}
    command = ("evaluate", str(export), "--dataset", str(photos), "--num-workers", "0")
    assert error_line(hubtune(*command, cwd=tmp_path)) == (
        "hubtune: error: --output-dir 'evaluation' holds an earlier evaluation (eval_results.json, "
        "eval_confusion_matrix.png, eval_reliability_diagram.png); pass --overwrite-output-dir to replace it, or give "
        "another --output-dir")
    assert {name: (tmp_path / "evaluation" / name).read_bytes() for name in EVAL_FILES} == kept
    assert json.loads(kept[RESULTS_FILE])["dataset"]["id"] == first["dataset"]["id"] == str(renamed_test_set)
    proc = hubtune(*command, "--overwrite-output-dir", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == ("wrote evaluation/eval_results.json, evaluation/eval_confusion_matrix.png "
                                            "and evaluation/eval_reliability_diagram.png")
    assert json.loads((tmp_path / "evaluation" / RESULTS_FILE).read_text())["dataset"]["id"] == str(photos)


@pytest.mark.slow
def test_pushes_say_1_file_or_n_files(hub, export, photos, tmp_path):
    def pushed(proc: subprocess.CompletedProcess) -> list[tuple[int, str]]:
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = [re.fullmatch(r"pushed (\d+) (\w+) to \S+ \(verified size and hash on the Hub\)", line)
                for line in proc.stderr.splitlines()]
        return [(int(m[1]), m[2]) for m in said if m]

    repo_id = f"alice/counted-{uuid.uuid4().hex[:8]}"
    [(count, word)] = pushed(hubtune("push", str(export), repo_id, cwd=tmp_path, HF_TOKEN=TOKEN))
    assert count > 1 and word == "files"
    evaluated = hubtune("evaluate", repo_id, "--dataset", str(photos), "--num-workers", "0", "--push", cwd=tmp_path,
                        HF_TOKEN=TOKEN)
    assert pushed(evaluated) == [(1, "file")]  # the card
    assert evaluated.stdout.splitlines()[-1].startswith(f"added the result to the card of {repo_id}: ")


def test_predict_walks_directories_and_reports_unreadable_files_as_rows(export, renamed_test_set, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    folder = renamed_test_set / "test"
    for output in ("preds.csv", "preds.jsonl"):
        args = parser.parse_args([str(export), str(folder), "--top-k", "2", "--num-workers", "2", "--batch-size", "4",
                                  "--output", str(tmp_path / output)])
        assert run_predict(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == 29 and [r["image"] for r in rows] == sorted(str(p) for p in folder.rglob("*.*"))
    broken = {Path(r["image"]).name: r["error"] for r in rows if "error" in r}
    assert broken == {"zero_bytes.jpg": "not a readable image", "truncated.jpg": "not a readable image",
                      "not_an_image.png": "not a readable image"}
    clf = ImageClassifier.from_pretrained(export)
    good = [r for r in rows if "predictions" in r]
    expected = clf.predict([r["image"] for r in good], top_k=2)
    assert [[p["label"] for p in r["predictions"]] for r in good] == [[p["label"] for p in e] for e in expected]
    csv_lines = (tmp_path / "preds.csv").read_text().splitlines()
    assert csv_lines[0] == "image,label_1,score_1,label_2,score_2,error" and len(csv_lines) == 30
    assert "3 of 29 images could not be read" in capsys.readouterr().err


def test_predict_takes_arrays_and_tensors_and_any_float_dtype(export):
    from PIL import Image

    clf = ImageClassifier.from_pretrained(export, device="cpu")
    image = make_rgb(0, random.Random(5))
    array = np.asarray(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    reference = clf.predict(image, top_k=2)[0]
    for item in (array, array / 255.0, tensor, tensor.float() / 255):
        got = clf.predict(item, top_k=2)[0]
        assert [p["label"] for p in got] == [p["label"] for p in reference]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in reference], abs=1e-2)
    assert clf.predict(np.asarray(image.convert("L")))[0][0]["label"] in ("cat", "dog")
    with pytest.raises(ValueError, match=r"image 0: an image array must be HxW or CxHxW with 1, 3 or 4 channels"):
        clf.predict(torch.zeros(2, 3, 8, 8))
    half = ImageClassifier.from_pretrained(export, device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.predict(Image.fromarray(array), top_k=1)[0][0]["label"] == reference[0]["label"]
    with pytest.raises(ValueError, match="dtype must be a floating point torch dtype"):
        ImageClassifier.from_pretrained(export, dtype="int8")
