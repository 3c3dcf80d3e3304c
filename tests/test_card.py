"""Model card: Hub metadata round trip, embedded images, strict template variables, golden file, wheel contents.

The golden test renders the hand-written run in tests/fixtures/cards/run/ (fixed wall time, versions, shas) and
compares it with tests/fixtures/cards/expected_card.md. After an intended change of the template or card.py,
regenerate the golden file and review its diff:

    HUBTUNE_UPDATE_GOLDEN=1 python -m pytest tests/test_card.py -k golden
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import pytest
from jinja2 import meta

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
GOLDEN = FIXTURES / "expected_card.md"
REPO_ROOT = Path(__file__).parent.parent
REPO_ID = "alice/resnet18-flowers-3"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A copy of the hand-written run (plots are written next to README.md, so never into the fixtures)."""
    return Path(shutil.copytree(FIXTURES / "run", tmp_path / "run"))


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A real, tiny training run's output directory (about 15 s)."""
    from helpers import make_image_dataset

    from hubtune.config import TrainConfig
    from hubtune.train import train

    root = tmp_path_factory.mktemp("card_run")
    data = make_image_dataset(root / "data", "parquet", per_class=20, bad=True)
    out = root / "out"
    train(TrainConfig(model="test_resnet", pretrained=False, dataset=str(data), image_size=32,
                      epochs=2, batch_size=16, num_workers=0, max_bad_fraction=0.1, progress=False,
                      output_dir=str(out)))
    return out


def edit_run_info(run_dir: Path, **changes) -> None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = metrics["run_info"]
        for name in parents:
            node = node[name]
        node[key] = value
    path.write_text(json.dumps(metrics))


def eval_results(card) -> dict[str, object]:
    from huggingface_hub.repocard_data import model_index_to_eval_results

    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    return results


def assert_metrics_match(card, best: dict) -> None:
    results = eval_results(card)
    values = {r.metric_type: r.metric_value for r in results}
    assert values == pytest.approx({"accuracy": best["val_accuracy"], "f1": best["val_f1"], "loss": best["val_loss"]},
                                   abs=5e-5)
    assert {r.task_type for r in results} == {"image-classification"}


def test_metadata_round_trip(run_dir):
    from huggingface_hub import ModelCard, ModelCardData

    from hubtune.card import TAGS, write_card

    card = ModelCard.load(write_card(run_dir, repo_id=REPO_ID))
    data = ModelCardData(**card.data.to_dict())  # what the Hub's parser accepts before an upload
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert set(TAGS) == {"timm", "image-classification", "hubtune", "transfer-learning"} <= set(data.tags)
    assert data.base_model == "timm/resnet18.a1_in1k"
    assert data.base_model_relation == "finetune"
    assert data.datasets == ["alice/flowers-3"]
    assert data.license == "apache-2.0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_metrics_match(card, metrics["best"])
    result = eval_results(card)[0]
    assert result.dataset_type == result.dataset_name == "alice/flowers-3"
    assert result.dataset_revision == metrics["run_info"]["dataset"]["revision"]
    assert result.dataset_split == "train (10% held out)"
    assert card.data.to_dict()["model-index"][0]["name"] == "resnet18-flowers-3"


def test_check_metadata_rejects_a_wrong_card(run_dir):
    from huggingface_hub import ModelCard

    from hubtune.card import check_metadata, render_card
    from hubtune.records import BestRecord

    card = render_card(run_dir, repo_id=REPO_ID)
    written = json.loads((run_dir / "metrics.json").read_text())["best"]
    best = BestRecord.from_json(written)
    check_metadata(card, best)
    with pytest.raises(ValueError, match="model-index accuracy: expected 0.5000"):
        check_metadata(card, BestRecord.from_json({**written, "val_accuracy": 0.5}))
    with pytest.raises(ValueError, match="library_name: expected 'timm'"):
        check_metadata(ModelCard(str(card).replace("library_name: timm", "library_name: transformers")), best)


def test_trained_run(trained_dir):
    """A real run with a local dataset and no base model: metadata still valid, nothing invented."""
    from huggingface_hub import ModelCard

    from hubtune.card import card_files, write_card

    path = write_card(trained_dir)
    assert path == trained_dir / "README.md"
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    for absent in ("base_model", "base_model_relation", "datasets", "license"):  # local data, random init
        assert absent not in meta
    assert_metrics_match(card, json.loads((trained_dir / "metrics.json").read_text())["best"])
    body = card.text
    assert 'timm.create_model("hf-hub:<your-repo-id>", pretrained=True)' in body
    assert "hubtune predict <your-repo-id> image.jpg" in body
    assert "`cat`, `dog`" in body
    assert "**Small validation set:**" in body  # a dozen validation images
    assert "could not be decoded" in body
    assert card_files(trained_dir) == ["README.md", "plots/confusion_matrix.png", "plots/training_curves.png"]


@pytest.mark.parametrize(
    ("base_license", "flag", "expected", "wording"),
    [
        ("apache-2.0", None, "apache-2.0", "inherited from the base model's card"),
        (None, "mit", "mit", "as given with `--license`"),
        (None, None, None, "**License:** none set"),
        ("apache-2.0", "mit", "apache-2.0", "inherited from the base model's card"),
    ],
)
def test_license(run_dir, caplog, base_license, flag, expected, wording):
    from hubtune.card import render_card

    edit_run_info(run_dir, base_model__license=base_license)
    with caplog.at_level(logging.WARNING, logger="hubtune.card"):
        card = render_card(run_dir, repo_id=REPO_ID, license=flag)
    assert card.data.to_dict().get("license") == expected
    assert wording in card.text
    assert ("--license 'mit' ignored" in caplog.text) == (base_license is not None and flag is not None)


def test_every_embedded_image_exists(run_dir, trained_dir):
    from hubtune.card import card_files, write_card

    for folder in (run_dir, trained_dir):
        text = write_card(folder, repo_id=REPO_ID).read_text()
        links = IMAGE_LINK.findall(text)
        assert sorted(links) == ["plots/confusion_matrix.png", "plots/training_curves.png"]
        for link in links:
            assert (folder / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
        assert card_files(folder) == ["README.md", *links]


def test_template_variables_are_provided(run_dir):
    from hubtune import card

    env = card.environment()
    source, _, _ = env.loader.get_source(env, card.TEMPLATE)
    used = meta.find_undeclared_variables(env.parse(source))
    outputs = card.load_outputs(run_dir)
    card_data, context = card.build(outputs, repo_id=REPO_ID, plot_files=[])
    provided = {"card_data", *card_data.to_dict(), *context}
    assert used - card.OPTIONAL_VARIABLES <= provided, "the template uses variables card.py never provides"
    assert card.OPTIONAL_VARIABLES <= used, "OPTIONAL_VARIABLES lists variables the template does not use"

    # optional variables have defaults: dropping all of them still renders, with the repo placeholder
    bare_data, bare_context = card.build(outputs, repo_id=None, plot_files=[])
    bare = {k: v for k, v in bare_context.items() if k not in card.OPTIONAL_VARIABLES}
    assert "hf-hub:<your-repo-id>" in card.render(bare_data, bare)

    # a missing required variable is an error, not an empty string
    for required in ("architecture", "best", "hyperparameters"):
        broken = {k: v for k, v in context.items() if k != required}
        with pytest.raises(jinja2.UndefinedError, match=required):
            card.render(card_data, broken)


def test_golden_card(run_dir):
    from hubtune.card import write_card

    text = write_card(run_dir, repo_id=REPO_ID).read_text()
    if os.environ.get("HUBTUNE_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "card changed: rerun with HUBTUNE_UPDATE_GOLDEN=1 and review the diff"


def test_cli_arguments_and_errors(run_dir, tmp_path, capsys):
    from hubtune.card import add_card_arguments, render_card, run_card

    parser = argparse.ArgumentParser(prog="hubtune card")
    add_card_arguments(parser)
    args = parser.parse_args([str(run_dir), "--repo-id", REPO_ID, "--license", "mit"])
    assert run_card(args) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "README.md")
    assert "hubtune predict alice/resnet18-flowers-3 image.jpg" in (run_dir / "README.md").read_text()

    with pytest.raises(ValueError, match=r"missing metrics\.json and config\.json"):
        run_card(parser.parse_args([str(tmp_path / "empty")]))
    with pytest.raises(ValueError, match="--repo-id 'not a repo'"):
        render_card(run_dir, repo_id="not a repo")


def test_outputs_without_run_info_render_unknown(run_dir):
    """Outputs written before run_info existed: what only run_info records reads "unknown"."""
    from hubtune.card import render_card

    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["run_info"]
    path.write_text(json.dumps(metrics))
    card = render_card(run_dir, repo_id=REPO_ID)
    meta = card.data.to_dict()
    assert meta["base_model"] == "timm/resnet18.a1_in1k"  # read off --model
    assert meta["datasets"] == ["alice/flowers-3"]  # it has a Hub revision
    assert "license" not in meta  # never guessed
    assert "**Validation split:** unknown" in card.text
    assert "| torch | unknown |" in card.text
    assert "`resnet18` (unknown parameters)" in card.text
    assert "2 process(es), device type unknown" in card.text


@pytest.mark.slow
def test_wheel_ships_template(tmp_path):
    """A non-editable install (a built wheel) contains the template and renders cards from it."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("hubtune", "cards"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("hubtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hubtune/cards/model_card.md.j2" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
                    "--target", str(target)], check=True, capture_output=True)
    run = Path(shutil.copytree(FIXTURES / "run", tmp_path / "run"))
    code = ("import hubtune, hubtune.card as c; print(hubtune.__file__); print(c.template_dir()); "
            f"print(c.write_card({str(run)!r}))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)},
                          cwd=tmp_path, check=True, capture_output=True, text=True)  # not the checkout's cwd
    module, templates, written = done.stdout.split("\n")[:3]
    assert module.startswith(str(target)) and str(target) in templates
    assert Path(written).read_text().startswith("---\n")
