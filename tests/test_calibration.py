"""Calibration and confidence: ECE and its bins, bootstrap intervals, flip TTA, `hubtune train --calibrate` and the
temperature that ImageClassifier, `hubtune predict` and `hubtune evaluate` apply (and timm ignores)."""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from helpers import CLASSES, make_rgb
from PIL import Image

from hubtune import ImageClassifier, metrics
from hubtune.config import TrainConfig
from hubtune.errors import ModelSourceError
from hubtune.evaluation import EVAL_FILES, RELIABILITY_PLOT, RESULTS_FILE, add_evaluate_arguments, run_evaluate
from hubtune.predict import add_predict_arguments, run_predict
from hubtune.records import RunRecord
from hubtune.reproduce import plan
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]


def noisy_folder(root: Path, per_class: int, seed: int, flipped: float) -> Path:
    """Class subfolders of generated images, `flipped` of them filed under the other class (label noise)."""
    rng = random.Random(seed)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            filed = 1 - label if rng.random() < flipped else label
            (root / CLASSES[filed]).mkdir(parents=True, exist_ok=True)
            make_rgb(label, rng).save(root / CLASSES[filed] / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """An over-confident export: trained hard on clean images, validated on images with 30% wrong labels, where
    --calibrate fits its temperature."""
    root = tmp_path_factory.mktemp("noisy")
    noisy_folder(root / "train", per_class=24, seed=1, flipped=0.0)
    noisy_folder(root / "validation", per_class=24, seed=2, flipped=0.3)
    out = tmp_path_factory.mktemp("calibrated")
    train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(root), image_size=32, epochs=4,
                      batch_size=16, lr=3e-2, num_workers=0, output_dir=str(out), progress=False, calibrate=True))
    shutil.rmtree(out / "checkpoints")
    return out


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Another split like the validation one (30% wrong labels), never seen in training or calibration."""
    return noisy_folder(tmp_path_factory.mktemp("held_out"), per_class=30, seed=3, flipped=0.3)


def evaluate(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args([*argv, "--num-workers", "0"])
    assert run_evaluate(args) == 0
    return json.loads((Path(args.output_dir) / RESULTS_FILE).read_text())


def without_temperature(export: Path, to: Path) -> Path:
    shutil.copytree(export, to)
    config = json.loads((to / "config.json").read_text())
    del config["temperature"]
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_ece_equals_a_hand_computation_on_known_probabilities():
    # torchmetrics' documented example: multiclass_calibration_error(preds, target, num_classes=3, n_bins=3) == 0.2
    probs = torch.tensor([[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]])
    target = torch.tensor([0, 1, 2, 0])
    bins = metrics.calibration_bins(probs.log(), target, n_bins=3)
    # bin [1/3, 2/3): 0.55, 0.55, 0.60, one right; bin [2/3, 1): 0.90, right
    by_hand = 3 / 4 * abs(1 / 3 - (0.55 + 0.55 + 0.60) / 3) + 1 / 4 * abs(1.0 - 0.90)
    assert metrics.expected_calibration_error(bins) == pytest.approx(by_hand, abs=1e-6)
    assert by_hand == pytest.approx(0.2)
    # 15 bins; a confidence of exactly 1.0 is a bin of its own, as in torchmetrics
    logits = torch.tensor([[200.0, 0.0], [0.0, 0.1], [3.0, 0.0]])
    labels = torch.tensor([1, 1, 0])
    conf = logits.softmax(-1).max(-1).values
    assert conf[0] == 1.0
    by_hand = (abs(0.0 - 1.0) + abs(1.0 - conf[1].item()) + abs(1.0 - conf[2].item())) / 3
    bins = metrics.calibration_bins(logits, labels)
    assert bins.shape == (16, 3) and bins[15].tolist() == [1.0, 1.0, 0.0]
    assert metrics.expected_calibration_error(bins) == pytest.approx(by_hand, abs=1e-6)
    rows = metrics.describe_bins(bins)
    assert [r["count"] for r in rows if r["count"]] == [1, 1, 1] and rows[-1]["lower"] == rows[-1]["upper"] == 1.0


def test_calibration_bins_of_uneven_shards_add_up_to_those_of_the_whole():
    torch.manual_seed(0)
    logits, labels = torch.randn(301, 5) * 3, torch.randint(0, 5, (301,))
    whole = metrics.calibration_bins(logits, labels)
    shards = [metrics.calibration_bins(logits[a:b], labels[a:b]) for a, b in ((0, 17), (17, 200), (200, 301))]
    summed = sum(shards, torch.zeros_like(whole))  # what accelerator.reduce(..., "sum") does across processes
    assert torch.equal(summed[:, [0, 2]], whole[:, [0, 2]])  # counts and correct counts: exactly
    assert torch.allclose(summed, whole, rtol=0, atol=1e-9)
    assert metrics.expected_calibration_error(summed) == pytest.approx(metrics.expected_calibration_error(whole),
                                                                       abs=1e-12)


@pytest.mark.slow
def test_two_processes_give_the_ece_bins_and_intervals_of_one(calibrated, held_out, tmp_path):
    single = evaluate(str(calibrated), "--dataset", str(held_out), "--output-dir", str(tmp_path / "one"), "--tta")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hubtune.cli", "evaluate", str(calibrated),
         "--dataset", str(held_out), "--num-workers", "0", "--tta", "--output-dir", str(tmp_path / "two")],
        check=False, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads((tmp_path / "two" / RESULTS_FILE).read_text())
    assert double["num_processes"] == 2 and double["examples"] == single["examples"]
    assert [b["count"] for b in double["calibration"]["bins"]] == [b["count"] for b in single["calibration"]["bins"]]
    assert double["metrics"]["ece"] == pytest.approx(single["metrics"]["ece"], abs=1e-9)
    assert double["calibration"]["uncalibrated"]["ece"] == pytest.approx(single["calibration"]["uncalibrated"]["ece"],
                                                                         abs=1e-9)
    assert double["confidence_intervals"] == single["confidence_intervals"]


def test_bootstrap_intervals_contain_the_estimate_are_deterministic_and_match_resampling_examples():
    conf = torch.tensor([[40, 8, 2], [6, 30, 4], [1, 5, 24]])
    point = metrics.from_confusion(conf, ["a", "b", "c"])
    ci = metrics.bootstrap_intervals(conf)
    assert ci == metrics.bootstrap_intervals(conf)  # seeded
    assert ci != metrics.bootstrap_intervals(conf, seed=1)
    for name in ("accuracy", "f1"):
        low, high = ci[name]
        assert low < point[name] < high and high - low < 0.25
    wider = metrics.bootstrap_intervals(conf, level=0.99)
    assert wider["accuracy"][0] <= ci["accuracy"][0] and wider["accuracy"][1] >= ci["accuracy"][1]
    assert metrics.bootstrap_intervals(torch.diag(torch.tensor([5, 7])))["accuracy"] == [1.0, 1.0]
    # the same as resampling the examples themselves
    true = torch.repeat_interleave(torch.arange(9) // 3, conf.flatten())
    pred = torch.repeat_interleave(torch.arange(9) % 3, conf.flatten())
    g = torch.Generator().manual_seed(5)
    draws = torch.randint(0, len(true), (4000, len(true)), generator=g)
    naive = (true[draws] == pred[draws]).double().mean(1)
    assert torch.quantile(naive, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist() == pytest.approx(
        ci["accuracy"], abs=0.015)


def test_flip_tta_changes_nothing_on_a_mirror_symmetric_image_and_is_recorded_on_real_ones(calibrated, held_out,
                                                                                          tmp_path):
    clf = ImageClassifier.from_pretrained(calibrated, device="cpu")
    half = torch.randn(4, 3, 32, 16)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    assert torch.allclose(clf.logits(symmetric, tta=True), clf.logits(symmetric), atol=1e-5)
    # every column alike: the image is its own mirror image whatever timm's eval crop cuts off one side
    stripes = np.repeat(np.asarray(make_rgb(0, random.Random(4), size=32))[:, :1], 40, axis=1)
    with_tta, without = clf.predict(stripes, top_k=2, tta=True)[0], clf.predict(stripes, top_k=2)[0]
    assert [p["label"] for p in with_tta] == [p["label"] for p in without]
    assert [p["score"] for p in with_tta] == pytest.approx([p["score"] for p in without], abs=1e-5)
    assert not torch.allclose(clf.logits(torch.randn(2, 3, 32, 32), tta=True), clf.logits(torch.randn(2, 3, 32, 32)))
    plain = evaluate(str(calibrated), "--dataset", str(held_out), "--output-dir", str(tmp_path / "plain"))
    flipped = evaluate(str(calibrated), "--dataset", str(held_out), "--output-dir", str(tmp_path / "tta"), "--tta")
    assert plain["tta"] is None and flipped["tta"] == "hflip"
    assert flipped["examples"] == plain["examples"] == 60
    assert flipped["metrics"]["loss"] != pytest.approx(plain["metrics"]["loss"], abs=1e-6)


def test_evaluate_writes_ece_bootstrap_intervals_and_a_reliability_diagram(calibrated, held_out, tmp_path, capsys):
    result = evaluate(str(calibrated), "--dataset", str(held_out), "--output-dir", str(tmp_path / "out"))
    assert RELIABILITY_PLOT in EVAL_FILES and (tmp_path / "out" / RELIABILITY_PLOT).stat().st_size > 1000
    cal = result["calibration"]
    assert cal["n_bins"] == 15 and len(cal["bins"]) == 16 and sum(b["count"] for b in cal["bins"]) == 60
    from_bins = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in cal["bins"] if b["count"]) / 60
    assert result["metrics"]["ece"] == cal["ece"] == pytest.approx(from_bins, abs=1e-9)
    ci = result["confidence_intervals"]
    assert (ci["level"], ci["resamples"], ci["method"]) == (0.95, 1000, "percentile bootstrap over the examples")
    for name in ("accuracy", "f1"):
        assert ci[name][0] <= result["metrics"][name] <= ci[name][1]
    out = capsys.readouterr().out
    assert f"ECE {cal['ece']:.4f}" in out and "95% bootstrap intervals: accuracy [" in out
    assert out.splitlines()[-1].endswith(f"and {tmp_path / 'out' / RELIABILITY_PLOT}")


def test_calibrate_fits_a_temperature_that_lowers_ece_on_a_held_out_split(calibrated, held_out, tmp_path):
    record = json.loads((calibrated / "metrics.json").read_text())["calibration"]
    config = json.loads((calibrated / "config.json").read_text())
    assert config["temperature"] == record["temperature"] > 1  # over-confident: the softmax is flattened
    assert record["examples"] == json.loads((calibrated / "metrics.json").read_text())["val_examples"] == 48
    assert record["ece_after"] < record["ece_before"] and record["nll_after"] < record["nll_before"]
    # timm loads the same export (ignoring the temperature); the card says so and shows the diagram
    assert timm.create_model(f"local-dir:{calibrated}", pretrained=True).num_classes == 2
    card = (calibrated / "README.md").read_text()
    assert f"T = {record['temperature']:.4f}" in card and "**timm and transformers ignore it:**" in card
    assert "![Reliability diagram" in card and (calibrated / "plots" / "reliability_diagram.png").is_file()
    # on images that neither training nor calibration saw
    result = evaluate(str(calibrated), "--dataset", str(held_out), "--output-dir", str(tmp_path / "held_out"))
    cal = result["calibration"]
    assert cal["temperature"] == record["temperature"]
    assert cal["ece"] < cal["uncalibrated"]["ece"] and result["metrics"]["loss"] < cal["uncalibrated"]["loss"]
    bare = evaluate(str(without_temperature(calibrated, tmp_path / "bare")), "--dataset", str(held_out),
                    "--output-dir", str(tmp_path / "bare_eval"))
    assert bare["calibration"]["temperature"] is None and "uncalibrated" not in bare["calibration"]
    assert bare["metrics"]["ece"] == pytest.approx(cal["uncalibrated"]["ece"], abs=1e-9)
    assert bare["confusion_matrix"] == result["confusion_matrix"]  # the temperature never changes a prediction


def test_predict_and_image_classifier_divide_the_logits_by_the_temperature(calibrated, tmp_path, capsys):
    temperature = json.loads((calibrated / "config.json").read_text())["temperature"]
    clf = ImageClassifier.from_pretrained(calibrated, device="cpu")
    assert clf.temperature == temperature and f"temperature={temperature:.4g}" in repr(clf)
    image = tmp_path / "cat.png"
    make_rgb(0, random.Random(9), size=32).save(image)
    net = timm.create_model(f"local-dir:{calibrated}", pretrained=True).eval()
    with torch.no_grad():
        logits = net(clf.transform(Image.open(image).convert("RGB"))[None])[0]
    got = clf.predict(str(image), top_k=2)[0]
    assert [p["score"] for p in got] == pytest.approx(sorted((logits / temperature).softmax(-1).tolist())[::-1],
                                                      abs=1e-5)
    raw = ImageClassifier.from_pretrained(without_temperature(calibrated, tmp_path / "bare"), device="cpu")
    assert raw.temperature is None
    assert raw.predict(str(image))[0][0]["score"] == pytest.approx(logits.softmax(-1).max().item(), abs=1e-5)
    assert raw.predict(str(image))[0][0]["score"] > got[0]["score"]  # calibrated: less sure
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    assert run_predict(parser.parse_args([str(calibrated), str(image), "--top-k", "2", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [p["score"] for p in rows[0]["predictions"]] == pytest.approx([p["score"] for p in got], abs=1e-6)
    saved = clf.save_pretrained(tmp_path / "saved")  # the temperature goes with the model
    assert json.loads((saved / "config.json").read_text())["temperature"] == temperature


@pytest.mark.slow
@pytest.mark.parametrize("value", ["hot", -1.0, 0, True, float("inf")])
def test_a_temperature_that_is_not_a_positive_number_is_refused_in_one_line(calibrated, tmp_path, value):
    edited = tmp_path / "edited"
    shutil.copytree(calibrated, edited)
    config = json.loads((edited / "config.json").read_text())
    config["temperature"] = value
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=rf"{edited}: config.json has temperature {value!r}, expected a "
                                               r"positive number"):
        ImageClassifier.from_pretrained(edited)
    if value == "hot":  # as a user sees it
        proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "predict", str(edited), str(edited)],
                              check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"hubtune: error: {edited}: config.json has temperature 'hot', expected a positive number (the softmax "
            "temperature `hubtune train --calibrate` fits); fix it or remove the key")


def test_reproduce_reruns_with_calibrate(calibrated, tmp_path):
    config = yaml.safe_load((calibrated / "train_config.yaml").read_text())
    assert config["calibrate"] is True
    cfg, _, _ = plan(config, RunRecord.from_json(json.loads((calibrated / "metrics.json").read_text())),
                     str(tmp_path / "again"))
    assert cfg.calibrate is True


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 4, generator=g) * 4
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=g).squeeze(1)
    from hubtune.calibration import fit_temperature

    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    assert math.isfinite(fit_temperature(logits, logits.argmax(1)))  # all right: bounded, not 0
