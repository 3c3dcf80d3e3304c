"""ImageClassifier and `hubtune predict` against local directories and the local Hub, through the real clients."""

from __future__ import annotations

import argparse
import io
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi
from PIL import Image

from hubtune.classifier import ImageClassifier
from hubtune.predict import add_predict_arguments, run_predict

LABELS = ["a", "b", "c"]
TOKEN = "tok-alice-write"  # conftest's write token for alice (module-scoped fixtures cannot use `hub_token`)


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=3)
    with torch.no_grad():
        model.fc.weight.normal_(0, 3)  # spread the scores so rankings differ between images
    return model.eval()


def _export(model: torch.nn.Module, path: Path, pickled: bool = False) -> Path:
    timm.models.save_for_hf(model, path, model_config={"label_names": LABELS}, safe_serialization=True)
    if pickled:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def _upload(api: HfApi, folder: Path, private: bool = False) -> tuple[str, str]:
    repo_id = f"alice/clf-{uuid.uuid4().hex[:10]}"
    api.create_repo(repo_id, private=private)
    return repo_id, api.upload_folder(repo_id=repo_id, folder_path=folder).oid


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _assert_same(got: list[list[dict]], expected: list[list[dict]]) -> None:
    """Same labels in the same order and scores equal up to float noise (batch composition changes the sums)."""
    assert [[p["label"] for p in r] for r in got] == [[p["label"] for p in r] for r in expected]
    for g, e in zip(got, expected):
        assert [p["score"] for p in g] == pytest.approx([p["score"] for p in e], abs=1e-5)


def _fetched(hub, repo_id: str, name: str) -> bool:
    return any(m == "GET" and p.startswith(f"/{repo_id}/resolve/") and p.endswith("/" + name)
               for m, p, _, _ in list(hub.requests))


@pytest.fixture(scope="module")
def models() -> SimpleNamespace:
    return SimpleNamespace(v1=_tiny(0), v2=_tiny(1), x=torch.randn(2, 3, 160, 160))


@pytest.fixture(scope="module")
def local_dir(models, tmp_path_factory) -> Path:
    return _export(models.v1, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def repo(hub, models, tmp_path_factory) -> SimpleNamespace:
    """A Hub repo whose first commit (also branch v1) holds models.v1 and whose main holds models.v2."""
    api = HfApi(token=TOKEN)
    repo_id, first = _upload(api, _export(models.v1, tmp_path_factory.mktemp("v1")))
    api.create_branch(repo_id, branch="v1", revision=first)
    second = api.upload_folder(repo_id=repo_id, folder_path=_export(models.v2, tmp_path_factory.mktemp("v2"))).oid
    return SimpleNamespace(id=repo_id, first=first, second=second)


@pytest.fixture(scope="module")
def classifier(local_dir) -> ImageClassifier:
    return ImageClassifier.from_pretrained(local_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 30), (30, 30, 30)]):
        img = Image.new("RGB", (48, 40), color)
        img.paste((255 - color[0], 128, color[2] // 2), (5 + 4 * i, 5, 25 + 3 * i, 30))
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    return paths


def test_local_dir_loads_in_eval_mode_with_labels(local_dir, models, classifier):
    assert classifier.label_names == LABELS and classifier.num_classes == 3 and classifier.revision is None
    assert not classifier.model.training and classifier.device == torch.device("cpu")
    assert classifier.data_config["input_size"] == (3, 160, 160)
    assert classifier.transform(Image.new("RGB", (50, 30))).shape == (3, 160, 160)
    torch.testing.assert_close(_logits(classifier.model, models.x), _logits(models.v1, models.x))
    for spec in (str(local_dir), f"local-dir:{local_dir}"):
        assert ImageClassifier.from_pretrained(spec, device="cpu").label_names == LABELS
    assert repr(classifier) == f"ImageClassifier({str(local_dir)!r}, test_resnet, 3 classes, device=cpu)"
    with pytest.raises(ValueError, match="device must be a torch device like 'cpu'.*not 'gpu0'"):
        ImageClassifier.from_pretrained(local_dir, device="gpu0")


def test_hub_by_commit_branch_and_default_branch(repo, models, tmp_path):
    by_sha = ImageClassifier.from_pretrained(repo.id, repo.first, cache_dir=tmp_path, device="cpu")
    assert by_sha.revision == repo.first and by_sha.label_names == LABELS and not by_sha.model.training
    plain = timm.create_model(f"hf-hub:{repo.id}@{repo.first}", pretrained=True, cache_dir=tmp_path / "timm").eval()
    assert plain.pretrained_cfg["label_names"] == LABELS
    torch.testing.assert_close(_logits(by_sha.model, models.x), _logits(plain, models.x))
    torch.testing.assert_close(_logits(by_sha.model, models.x), _logits(models.v1, models.x))

    for spec, revision in ((repo.id, "v1"), (f"hf-hub:{repo.id}@v1", None)):
        assert ImageClassifier.from_pretrained(spec, revision, cache_dir=tmp_path).revision == repo.first
    latest = ImageClassifier.from_pretrained(f"hf-hub:{repo.id}", cache_dir=tmp_path, device="cpu")
    assert latest.revision == repo.second
    torch.testing.assert_close(_logits(latest.model, models.x), _logits(models.v2, models.x))


def test_predict_paths_pil_and_bytes_agree_sorted_with_top_k(classifier, images):
    by_path = classifier.predict(images, top_k=3)
    by_pil = classifier.predict([Image.open(p) for p in images], top_k=3)
    by_bytes = classifier.predict([p.read_bytes() for p in images], top_k=3)
    assert len(by_path) == len(images)
    _assert_same(by_pil, by_path)
    _assert_same(by_bytes, by_path)
    for path_preds in by_path:
        scores = [p["score"] for p in path_preds]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert sorted(p["label"] for p in path_preds) == LABELS and all(isinstance(s, float) for s in scores)
    assert len({round(preds[0]["score"], 3) for preds in by_path}) == len(images), "images should score apart"

    top1 = classifier.predict(images)
    assert [t[0] for t in top1] == [preds[0] for preds in by_path] and all(len(t) == 1 for t in top1)
    _assert_same(classifier.predict(str(images[0]), top_k=10), by_path[:1])  # one image in, clipped to 3 classes
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            classifier.predict(images, top_k=bad)
    with pytest.raises(ValueError, match="batch_size must be"):
        classifier.predict(images, batch_size=0)


def test_batching_matches_one_by_one(classifier, images):
    batched = classifier.predict(images, top_k=3, batch_size=2)
    _assert_same(batched, [classifier.predict(p, top_k=3)[0] for p in images])


def test_unreadable_images_are_named(classifier, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=f"{broken}: not a readable image"):
        classifier.predict([images[0], broken])
    with pytest.raises(ValueError, match="missing.png: cannot read the image file"):
        classifier.predict(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with pytest.raises(ValueError, match="^image 2: not a readable image"):
        classifier.predict([buf.getvalue(), images[1], b"garbage"], batch_size=2)
    with pytest.raises(TypeError, match="file paths, bytes, PIL images, numpy arrays or tensors, got int"):
        classifier.predict([3])


def test_pickled_only_directory_refused_unless_trusted(models, tmp_path):
    folder = _export(models.v1, tmp_path / "pickled", pickled=True)
    with pytest.raises(ValueError, match="pytorch_model.bin.*trust_pickled_weights=True.*--trust-pickled-weights"):
        ImageClassifier.from_pretrained(folder)
    trusted = ImageClassifier.from_pretrained(folder, trust_pickled_weights=True, device="cpu")
    torch.testing.assert_close(_logits(trusted.model, models.x), _logits(models.v1, models.x))


def test_pickled_only_repo_refused_before_download_unless_trusted(hub, models, tmp_path):
    repo_id, sha = _upload(HfApi(token=TOKEN), _export(models.v2, tmp_path / "pickled", pickled=True))
    with pytest.raises(ValueError, match=f"{repo_id}.*pytorch_model.bin.*trust_pickled_weights=True"):
        ImageClassifier.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert not _fetched(hub, repo_id, "pytorch_model.bin")
    trusted = ImageClassifier.from_pretrained(repo_id, trust_pickled_weights=True, cache_dir=tmp_path / "cache")
    assert trusted.revision == sha and trusted.label_names == LABELS
    torch.testing.assert_close(_logits(trusted.model, models.x), _logits(models.v2, models.x))


def test_safetensors_preferred_and_pickle_never_fetched(hub, models, tmp_path):
    folder = _export(models.v1, tmp_path / "both")
    torch.save(models.v2.state_dict(), folder / "pytorch_model.bin")  # different weights: shows which file loaded
    repo_id, _ = _upload(HfApi(token=TOKEN), folder)
    for source in (folder, repo_id):
        loaded = ImageClassifier.from_pretrained(source, cache_dir=tmp_path / "cache", device="cpu")
        torch.testing.assert_close(_logits(loaded.model, models.x), _logits(models.v1, models.x))
    assert _fetched(hub, repo_id, "model.safetensors") and not _fetched(hub, repo_id, "pytorch_model.bin")


def test_private_repo_needs_token(hub, local_dir, tmp_path):
    repo_id, sha = _upload(HfApi(token=TOKEN), local_dir, private=True)
    with pytest.raises(ValueError, match=f"{repo_id}.*HF_TOKEN"):
        ImageClassifier.from_pretrained(repo_id, cache_dir=tmp_path)
    assert ImageClassifier.from_pretrained(repo_id, token=TOKEN, cache_dir=tmp_path).revision == sha


def test_offline_mode_uses_the_cached_snapshot(repo, models, tmp_path, monkeypatch):
    ImageClassifier.from_pretrained(repo.id, "v1", cache_dir=tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = ImageClassifier.from_pretrained(repo.id, "v1", cache_dir=tmp_path, device="cpu")
    assert offline.revision == repo.first
    torch.testing.assert_close(_logits(offline.model, models.x), _logits(models.v1, models.x))
    with pytest.raises(ValueError, match="not in the local HF cache and HF_HUB_OFFLINE is set"):
        ImageClassifier.from_pretrained(repo.id, cache_dir=tmp_path / "empty")


def test_missing_sources_are_one_line_errors(hub, repo, local_dir, tmp_path):
    cases = [
        (("alice/no-such-model",), "model repo 'alice/no-such-model' not found at .*HF_TOKEN"),
        ((repo.id, "no-such-branch"), "has no revision 'no-such-branch'; give an existing branch, tag or commit"),
        ((tmp_path / "nowhere",), "nowhere: no such directory"),
        (("./nowhere",), "nowhere: no such directory"),
        ((tmp_path,), "has no config.json"),
        ((local_dir, "main"), "applies to Hub repos only"),
        ((f"hf-hub:{repo.id}@v1", "main"), "names revision 'v1' but revision='main'"),
        (("not a repo",), "neither an existing local directory nor a Hub repo id"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            ImageClassifier.from_pretrained(*args, cache_dir=tmp_path / "cache")
        assert "\n" not in str(info.value)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes((local_dir / "model.safetensors").read_bytes())
    repo_id, _ = _upload(HfApi(token=TOKEN), weights_only)
    with pytest.raises(ValueError, match=f"/{repo_id} has no config.json; it is not a timm/hubtune model repo"):
        ImageClassifier.from_pretrained(repo_id, cache_dir=tmp_path / "cache")


def test_run_predict_text_and_json(local_dir, images, classifier, capsys):
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    expected = classifier.predict(images[:2], top_k=2)
    args = parser.parse_args([str(local_dir), str(images[0]), str(images[1]), "--top-k", "2", "--batch-size", "1"])
    assert run_predict(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{images[i]}: {p['label']} ({p['score']:.4f})" for i in range(2) for p in expected[i]]

    assert run_predict(parser.parse_args([str(local_dir), *map(str, images[:2]), "--json", "--top-k", "2"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == [str(images[0]), str(images[1])]
    _assert_same([r["predictions"] for r in out], expected)
    defaults = parser.parse_args([str(local_dir), str(images[0])])
    assert (defaults.top_k, defaults.json, defaults.revision, defaults.trust_pickled_weights, defaults.batch_size) == (
        1, False, None, False, 32)
