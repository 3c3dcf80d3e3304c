"""The Hub round trip through the real clients and the local server: pull, stream, push, verify, load, offline."""

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import make_image_dataset
from huggingface_hub import HfApi

from hubtune import hub as hub_lib
from hubtune.background import BackgroundPusher
from hubtune.hub import PushTarget
from hubtune.localhub import LocalHub

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-alice-write"


def unique(prefix: str) -> str:
    return f"alice/{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """A tiny backbone in timm format and a parquet Image+ClassLabel dataset, both on the local Hub."""
    import datasets

    api = HfApi(token=TOKEN)
    root = tmp_path_factory.mktemp("published")
    backbone = unique("backbone")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=7)
    timm.models.save_for_hf(net, str(root / "backbone"), safe_serialization=True)
    (root / "backbone" / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: timm\n---\n# backbone\n")
    api.create_repo(backbone, exist_ok=True)
    api.upload_folder(folder_path=str(root / "backbone"), repo_id=backbone)
    dataset = unique("cats-vs-dogs")
    path = make_image_dataset(root / "ds", "parquet", per_class=60, bad=True)
    exporting, datasets.config.USE_PARQUET_EXPORT = datasets.config.USE_PARQUET_EXPORT, False
    try:
        datasets.load_dataset("parquet", data_files=str(path), split="train").push_to_hub(dataset, token=TOKEN)
    finally:  # a module-level setting of datasets: other tests must not inherit it
        datasets.config.USE_PARQUET_EXPORT = exporting
    return {"backbone": backbone, "dataset": dataset}


def env_for(hub_url: str, home: Path, token: str | None = TOKEN, **extra) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_DATASETS_CACHE": str(home / "datasets"), "OMP_NUM_THREADS": "1", **extra}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def train_flags(published, out, *extra):
    return ["--model", published["backbone"], "--dataset", published["dataset"], "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--num-workers", "0", "--max-bad-fraction", "0.05",
            "--freeze", "stem,stages.0", "--output-dir", str(out), "--no-progress", *extra]


PREDICT = """
import json, sys, timm, torch
from hubtune import ImageClassifier
repo, paths = sys.argv[1], sys.argv[2:]
clf = ImageClassifier.from_pretrained(repo)
preds = clf.predict(paths, top_k=2)
net = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
cfg = timm.data.resolve_data_config({}, model=net)
tf = timm.data.create_transform(**cfg)
from PIL import Image
x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])  # plain timm use, no hubtune code
with torch.no_grad():
    probs = net(x).softmax(-1)
names = net.pretrained_cfg["label_names"]
timm_preds = [[{"label": names[i], "score": float(p[i])} for i in p.argsort(descending=True)[:2]] for p in probs]
print(json.dumps({"hubtune": preds, "timm": timm_preds}))
"""


@pytest.mark.slow
def test_acceptance_train_from_hub_push_and_load_in_a_clean_process(hub, published, tmp_path):
    target = unique("finetuned")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "hubtune/train.py",
         *train_flags(published, out, "--push-to-hub", target)],
        cwd=REPO, env=env_for(hub.url, tmp_path / "home1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified size and hash" in proc.stderr
    # the base model and dataset commits used are pinned in train_config.yaml and metrics.json
    api = HfApi(token=TOKEN)
    cfg = yaml.safe_load((out / "train_config.yaml").read_text())
    assert cfg["model_revision"] == api.model_info(published["backbone"]).sha
    assert cfg["dataset_revision"] == api.dataset_info(published["dataset"]).sha
    info = json.loads((out / "metrics.json").read_text())["run_info"]
    assert info["base_model"] == {"id": published["backbone"], "revision": cfg["model_revision"],
                                  "spec": published["backbone"], "license": "apache-2.0"}
    files = set(api.list_repo_files(target))
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml"} <= files
    assert not any(f.startswith("checkpoints/") for f in files) and not any("token" in f for f in files)
    # a second researcher: fresh process, empty cache, hubtune and plain timm agree exactly
    images = []
    for i, label in enumerate(("cat", "dog")):
        import random

        from helpers import make_rgb

        p = tmp_path / f"{label}.png"
        make_rgb(i, random.Random(100 + i)).save(p)
        images.append(str(p))
    loaded = subprocess.run([sys.executable, "-c", PREDICT, target, *images], cwd=REPO,
                            env=env_for(hub.url, tmp_path / "home2", token=None), capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    for ours, theirs in zip(result["hubtune"], result["timm"]):
        assert [p["label"] for p in ours] == [p["label"] for p in theirs]
        assert [p["score"] for p in ours] == pytest.approx([p["score"] for p in theirs], abs=1e-6)
    assert [preds[0]["label"] for preds in result["hubtune"]] == ["cat", "dog"]


@pytest.fixture(scope="module")
def finished_run(published, tmp_path_factory):
    from hubtune.config import TrainConfig
    from hubtune.train import train

    out = tmp_path_factory.mktemp("finished")
    cfg = TrainConfig(model=published["backbone"], dataset=published["dataset"], image_size=32, epochs=1,
                      batch_size=16, num_workers=0, max_bad_fraction=0.05, output_dir=str(out), progress=False)
    train(cfg)
    return out


def test_push_is_verified_idempotent_and_never_ships_checkpoints(hub, finished_run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    target = unique("pushed")
    url = hub_lib.push(finished_run, PushTarget(target, token=TOKEN))
    assert f"/{target}/commit/" in url
    api = HfApi(token=TOKEN)
    files = set(api.list_repo_files(target))
    assert "model.safetensors" in files and not any(f.startswith("checkpoints") for f in files)
    mark = hub.request_count
    hub_lib.push(finished_run, PushTarget(target, token=TOKEN))
    again = hub.requests_since(mark)
    assert not [r for r in again if r[0] == "PUT"], "unchanged files were uploaded again"
    assert not [r for r in again if r[0] == "POST" and "/commit/" in r[1]], "a no-op push made a commit"
    with_ckpt = hub_lib.files_to_push(finished_run, push_checkpoints=True)
    assert any(f.startswith("checkpoints/step-") for f in with_ckpt)


def test_push_refusals_name_the_fix(hub, finished_run):
    with pytest.raises(hub_lib.PushError, match=r"\(403\): your token cannot write to 'bob'.*run the same push again"):
        hub_lib.push(finished_run, PushTarget("bob/not-yours", token=TOKEN, retries=0))
    with pytest.raises(hub_lib.PushError, match=r"\(401\): set HF_TOKEN"):
        hub_lib.push(finished_run, PushTarget(unique("anon"), token=False, retries=0))
    with pytest.raises(ValueError, match="not a hubtune export: config.json is missing"):
        hub_lib.push(finished_run / "checkpoints", PushTarget(unique("x"), token=TOKEN))


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_server_dying_mid_push_then_rerun_completes(finished_run, tmp_path):
    tokens = {TOKEN: ("alice", "write")}
    server = LocalHub(tmp_path / "hub", tokens=tokens).start()
    port = server.port
    stopping = threading.Thread(target=server.stop)

    def die_at_commit(method: str, path: str) -> None:
        if method == "POST" and "/commit/" in path:
            stopping.start()  # the server goes down while this request is in flight
            raise ConnectionAbortedError("server going down")

    server.before_request = die_at_commit
    target = unique("interrupted")
    before = _digests(finished_run)
    with pytest.raises(hub_lib.PushError, match="run the same push again to complete it"):
        hub_lib.push(finished_run, PushTarget(target, token=TOKEN, endpoint=server.url, retries=1, retry_wait=0.01))
    assert _digests(finished_run) == before  # nothing local was touched
    stopping.join()
    restarted = LocalHub(tmp_path / "hub", port=port, tokens=tokens).start()
    try:
        url = hub_lib.push(finished_run, PushTarget(target, token=TOKEN, endpoint=restarted.url, retries=1,
                                                    retry_wait=0.01))
        assert f"{target}/commit/" in url
        files = set(HfApi(endpoint=restarted.url, token=TOKEN).list_repo_files(target))
        assert {"model.safetensors", "config.json", "metrics.json"} <= files
    finally:
        restarted.stop()


def test_card_edited_on_the_hub_is_kept_unless_overwrite(hub, finished_run):
    target = unique("carded")
    hub_lib.push(finished_run, PushTarget(target, token=TOKEN))
    api = HfApi(token=TOKEN)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# My own words\n", path_in_repo="README.md",
                    repo_id=target)
    hub_lib.push(finished_run, PushTarget(target, token=TOKEN))
    assert "My own words" in Path(api.hf_hub_download(target, "README.md")).read_text()
    hub_lib.push(finished_run, PushTarget(target, token=TOKEN, overwrite_card=True))
    assert "My own words" not in Path(api.hf_hub_download(target, "README.md")).read_text()


@pytest.mark.slow
def test_prefetch_then_offline_run_without_a_server(hub, published, tmp_path):
    home = tmp_path / "home"
    pre = subprocess.run([sys.executable, "-m", "hubtune.cli", "prefetch", "--model", published["backbone"],
                          "--dataset", published["dataset"]], cwd=REPO, env=env_for(hub.url, home),
                         capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    dead = "http://127.0.0.1:9"  # nothing listens there: any request would fail
    run = subprocess.run([sys.executable, "-m", "hubtune.cli", "train", *train_flags(published, tmp_path / "out")],
                         cwd=REPO, env=env_for(dead, home, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert cfg["dataset_revision"] == HfApi(token=TOKEN).dataset_info(published["dataset"]).sha


@pytest.mark.slow
def test_background_pushes_coalesce_and_failures_never_stop_training(published, tmp_path, monkeypatch):
    from hubtune.config import TrainConfig
    from hubtune.train import train

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = dict(model=published["backbone"], dataset=published["dataset"], image_size=32, epochs=2, batch_size=16,
                lr=3e-3, num_workers=0, max_bad_fraction=0.05, progress=False, push_every_save=True)
    target = unique("live")
    train(TrainConfig(**base, output_dir=str(tmp_path / "ok"), push_to_hub=target))
    api = HfApi(token=TOKEN)
    messages = [c.title for c in api.list_repo_commits(target)]
    history = json.loads((tmp_path / "ok" / "metrics.json").read_text())["history"]
    improvements = sum(1 for i, row in enumerate(history)
                       if all(row["val_accuracy"] > earlier["val_accuracy"] for earlier in history[:i]))
    # one push per improvement (two epochs: never more than one waiting, so nothing coalesces), none per step
    assert messages.count("hubtune: new best checkpoint") == improvements
    assert not list((tmp_path / "ok").glob(".push-*"))  # snapshots are cleaned up
    # pushes that would be refused (alice cannot write to bob's namespace) are found before training; pushes that
    # fail while training (a Hub answering 500) are test_a_push_that_cannot_succeed_ends_within_its_bound_...
    with pytest.raises(hub_lib.PushError, match="user 'alice' cannot create or write repos in 'bob'"):
        train(TrainConfig(**{**base, "epochs": 1}, output_dir=str(tmp_path / "refused"), push_to_hub="bob/live"))
    assert not (tmp_path / "refused").exists()


def test_image_classifier_push_to_hub_round_trip(hub, finished_run, tmp_path):
    import random

    from helpers import make_rgb

    from hubtune import ImageClassifier

    local = ImageClassifier.from_pretrained(finished_run)
    target = unique("from-python")
    url = local.push_to_hub(target, token=TOKEN)
    assert f"{target}/commit/" in url
    remote = ImageClassifier.from_pretrained(target, token=TOKEN)
    image = make_rgb(1, random.Random(7))
    assert remote.label_names == local.label_names == ["cat", "dog"]
    ours, theirs = local.predict(image, top_k=2)[0], remote.predict(image, top_k=2)[0]
    assert [p["label"] for p in ours] == [p["label"] for p in theirs]
    assert [p["score"] for p in ours] == pytest.approx([p["score"] for p in theirs], abs=1e-6)


def test_push_to_a_private_branch_and_the_card_loads_back(hub, finished_run):
    from huggingface_hub import ModelCard

    target = unique("private")
    hub_lib.push(finished_run, PushTarget(target, token=TOKEN, private=True, revision="dev", commit_message="first cut"))
    api = HfApi(token=TOKEN)
    assert api.model_info(target).private is True
    assert "model.safetensors" in api.list_repo_files(target, revision="dev")
    assert "model.safetensors" not in api.list_repo_files(target)  # main keeps only the initial commit
    assert [c.title for c in api.list_repo_commits(target, revision="dev")][0] == "first cut"
    assert HfApi(token=False).repo_exists(target) is False  # private: invisible without a token
    pushed = Path(api.hf_hub_download(target, "README.md", revision="dev")).read_text()
    local = (finished_run / "README.md").read_text()
    assert pushed.startswith(local.rstrip("\n"))
    public = unique("public-card")
    hub_lib.push(finished_run, PushTarget(public, token=TOKEN))
    card = ModelCard.load(public)
    assert card.data.to_dict() == ModelCard(local).data.to_dict()
    assert card.data.base_model == json.loads((finished_run / "metrics.json").read_text())["run_info"]["base_model"]["id"]


@pytest.mark.slow
def test_missing_hub_model_is_one_line_error(published, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "train",
                           *train_flags(published, tmp_path), "--model", "alice/no-such-backbone"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "--model 'alice/no-such-backbone': no such model repo on the Hub" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_retries_every_call_that_fails_once_and_completes(hub, finished_run, caplog):
    """A 503 or a dropped connection once on each of the push's own calls: each is retried and the push completes."""
    from faultproxy import FaultProxy

    target = unique("flaky")
    with FaultProxy(hub.url) as proxy:
        faults = [proxy.fail("POST", r"/api/repos/create$", status=503),
                  proxy.drop("*", rf"/{target}/resolve/main/README\.md$"),  # is the card on the Hub edited?
                  proxy.fail("POST", rf"/api/models/{target}/commit/", status=500),
                  proxy.fail("POST", rf"/api/models/{target}/paths-info/", status=503)]  # the verification read
        url = hub_lib.push(finished_run, PushTarget(target, token=TOKEN, endpoint=proxy.url, retry_wait=0.01))
    assert [f.applied for f in faults] == [1, 1, 1, 1]
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    for step in ("create_repo", "reading the card on the Hub", "upload", "verification"):
        assert any(m.startswith(f"{step} failed") for m in retried), (step, retried)
    files = HfApi(token=TOKEN).list_repo_files(target)
    assert f"{target}/commit/" in url and "model.safetensors" in files


def test_push_that_keeps_failing_says_where_and_how_often_and_changes_nothing(hub, finished_run):
    from faultproxy import FaultProxy

    target = unique("down")
    before = _digests(finished_run)
    with FaultProxy(hub.url) as proxy:
        proxy.fail("POST", rf"/api/models/{target}/commit/", status=500, times=None)
        with pytest.raises(hub_lib.PushError) as err:
            hub_lib.push(finished_run, PushTarget(target, token=TOKEN, endpoint=proxy.url, retries=2, retry_wait=0.01))
    assert str(err.value).startswith(f"push to {target} failed at upload after 3 attempts (HTTP 500)")
    assert str(err.value).endswith("run the same push again to complete it") and "\n" not in str(err.value)
    assert _digests(finished_run) == before


def test_a_corrupted_object_on_the_server_fails_verification_naming_the_file(hub, finished_run):
    import hashlib

    # the server already stores metrics.json's content; damaged on its disk, a new commit of it reuses the damage
    sha = hashlib.sha256((finished_run / "metrics.json").read_bytes()).hexdigest()
    hub_lib.push(finished_run, PushTarget(unique("first"), token=TOKEN))
    stored = hub.store.object_path(sha)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original.replace(b'"history"', b'"HISTORY"'))
        with pytest.raises(hub_lib.PushError, match=r"verification failed: metrics\.json on alice/second-\w+@\w+ "
                                                    r"differs from the local file"):
            hub_lib.push(finished_run, PushTarget(unique("second"), token=TOKEN))
    finally:
        stored.write_bytes(original)


@pytest.mark.slow
def test_a_server_that_holds_the_commit_times_out_with_one_line(hub, finished_run, tmp_path):
    from faultproxy import FaultProxy

    target = unique("held")
    with FaultProxy(hub.url) as proxy:
        held = proxy.hold("POST", rf"/api/models/{target}/commit/", timeout=120, times=None)
        proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "push", str(finished_run), target, "--retries", "1"],
                              cwd=REPO, env=env_for(proxy.url, tmp_path / "home", HUBTUNE_HUB_TIMEOUT="2"),
                              capture_output=True, text=True, timeout=120)
        held.release()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert held.applied == 2  # the first attempt and one retry, each given up after 2 s
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hubtune: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"push to {target} failed at upload after 2 attempts (ReadTimeout" in lines[0]


@pytest.mark.slow
def test_a_background_push_that_crashes_never_hangs_the_run(hub, published, tmp_path):
    """Every file upload refused: the background pushes fail (huggingface_hub wraps that in a RuntimeError), training
    still runs to the end, the final push fails with one line, and the process exits."""
    from faultproxy import FaultProxy

    target, out = unique("refused-uploads"), tmp_path / "run"
    with FaultProxy(hub.url) as proxy:
        refused = proxy.fail("PUT", r"/upload/", status=400, times=None)
        proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "train",
                               *train_flags(published, out, "--push-to-hub", target, "--push-every-save",
                                            "--seed", "1234")],  # weights no other test pushed: uploads needed
                              cwd=REPO, env=env_for(proxy.url, tmp_path / "home"), capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert refused.applied >= 2  # at least one background push and the final one
    assert "background upload of .push-" in proc.stderr and "failed" in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("hubtune: error: ")]
    assert len(error) == 1 and f"push to {target} failed at upload" in error[0] and "HTTP 400" in error[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["background_pushes"]["failed"] and not metrics["background_pushes"]["pushed"]
    assert not list(out.glob(".push-*"))


SNIPPET_CHECK = """
import json, sys
from hubtune import ImageClassifier
repo, image, snippet = sys.argv[1], sys.argv[2], sys.argv[3]
scope = {}
exec(snippet, scope)  # the card's timm snippet, as a reader would paste it (it prints its top-k)
theirs = {scope["labels"][i]: p.item() for p, i in zip(scope["top"].values, scope["top"].indices)}
ours = {p["label"]: p["score"] for p in ImageClassifier.from_pretrained(repo).predict(image, top_k=len(theirs))[0]}
print(json.dumps({"timm": theirs, "hubtune": ours}))
"""


def _python_blocks(card: str) -> dict[str, str]:
    """The card's ```python blocks, by the line that introduces them ("With timm:", ...)."""
    blocks, lines = {}, card.splitlines()
    for i, line in enumerate(lines):
        if line == "```python":
            end = lines.index("```", i)
            blocks[lines[i - 2]] = "\n".join(lines[i + 1:end])
    return blocks


@pytest.mark.slow
def test_the_cards_timm_snippet_sees_images_as_hubtune_does(hub, finished_run, tmp_path):
    """EXIF rotation and transparency: plain `.convert("RGB")` would disagree with hubtune on both."""
    import random
    import shutil

    from helpers import make_rgb
    from PIL import Image

    from hubtune.card import write_card

    target, export = unique("snippets"), tmp_path / "export"
    shutil.copytree(finished_run, export, ignore=shutil.ignore_patterns("checkpoints"))
    write_card(export, repo_id=target)
    hub_lib.push(export, PushTarget(target, token=TOKEN))
    snippet = _python_blocks((export / "README.md").read_text())["With timm:"]
    rotated = make_rgb(1, random.Random(3)).resize((40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    rgba = make_rgb(0, random.Random(4)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(tmp_path / "transparent.png")
    for name in ("rotated.jpg", "transparent.png"):
        image = str(tmp_path / name)
        proc = subprocess.run([sys.executable, "-c", SNIPPET_CHECK, target, image, snippet.replace("cat.jpg", image)],
                              cwd=REPO, env=env_for(hub.url, tmp_path / "home", token=None), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["timm"].keys() == result["hubtune"].keys() == {"cat", "dog"}
        for label, score in result["hubtune"].items():
            assert result["timm"][label] == pytest.approx(score, abs=1e-6), name


def test_background_uploads_run_one_at_a_time_and_only_the_newest_waits(tmp_path):
    started, release = threading.Event(), threading.Event()
    discarded, worked = [], []

    def work(item: Path, cancel: threading.Event) -> str:
        worked.append(item.name)
        started.set()
        assert release.wait(30)
        if item.name == "boom":
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.")
        return f"done {item.name}"

    pusher = BackgroundPusher(work, discard=lambda item: discarded.append(item.name))
    pusher.submit(tmp_path / "a")
    assert started.wait(30)  # "a" is in flight
    for name in ("b", "c", "boom"):
        pusher.submit(tmp_path / name)  # each replaces the one waiting
    release.set()
    assert pusher.close(timeout=30, drain=True)
    assert worked == ["a", "boom"] and discarded == ["b", "c", "a", "boom"]
    assert pusher.pushed == ["done a"] and pusher.failed == [
        {"item": "boom", "error": "Error while uploading 'model.safetensors' to the Hub."}]
    assert not pusher._thread.is_alive()


@pytest.mark.slow
def test_every_usage_snippet_of_the_card_runs_against_the_hub(hub, finished_run, tmp_path):
    """timm, hubtune and transformers, as a reader pastes them: an empty cache, no token, the pushed repo."""
    import random
    import shutil

    from helpers import make_rgb

    from hubtune.card import write_card

    target, export = unique("usage"), tmp_path / "export"
    shutil.copytree(finished_run, export, ignore=shutil.ignore_patterns("checkpoints"))
    write_card(export, repo_id=target)
    hub_lib.push(export, PushTarget(target, token=TOKEN))
    card = (export / "README.md").read_text()
    blocks = _python_blocks(card)
    assert sorted(blocks) == ["With hubtune:", "With timm:",
                              "With transformers (its `TimmWrapper` loads timm repos; `pip install transformers`):"]
    image = tmp_path / "cat.jpg"
    make_rgb(0, random.Random(8)).save(image)
    printed = {}
    for intro, code in blocks.items():
        code = code.replace('"cat.jpg"', repr(str(image)))
        if intro == "With hubtune:":  # its last line is an expression, as in a notebook
            code = code.rstrip().rsplit("\n", 1)[0] + "\nprint(" + code.rstrip().rsplit("\n", 1)[1] + ")"
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=env_for(hub.url, tmp_path / "home", token=None))
        assert proc.returncode == 0, (intro, proc.stderr[-3000:])
        printed[intro.split()[1]] = proc.stdout
    assert all("cat" in out for out in printed.values()), printed
    line = next(ln for ln in card.splitlines() if ln.startswith("hubtune predict "))
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", *line.split()[1:-1], str(image)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env_for(hub.url, tmp_path / "home"))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{image}: "), proc.stderr[-2000:]


@pytest.mark.slow
def test_upload_urls_signed_before_a_server_restart_are_renewed_and_the_token_is_not_blamed(finished_run, tmp_path,
                                                                                               caplog):
    """A Hub restarted mid-upload refuses the upload URLs it signed before (403): the push asks for new ones and
    completes, instead of saying that the token cannot write."""
    from faultproxy import FaultProxy
    from helpers import free_port

    tokens, port = {TOKEN: ("alice", "write")}, free_port()
    server = LocalHub(tmp_path / "hub", port=port, tokens=tokens).start()
    target, result = unique("restarted"), {}
    try:
        with FaultProxy(server.url) as proxy:
            held = proxy.hold("PUT", r"/upload/", timeout=60)  # the first upload waits while the server restarts

            def push() -> None:
                try:
                    result["url"] = hub_lib.push(finished_run, PushTarget(target, token=TOKEN, endpoint=proxy.url,
                                                                          retries=2, retry_wait=0.01))
                except Exception as err:  # noqa: BLE001 - asserted below
                    result["error"] = err

            pushing = threading.Thread(target=push)
            pushing.start()
            assert held.holding.wait(60)
            server.stop()
            server = LocalHub(tmp_path / "hub", port=port, tokens=tokens).start()  # a new signing key
            held.release()
            pushing.join(120)
        assert not pushing.is_alive()
        assert "error" not in result, result.get("error")
        assert f"{target}/commit/" in result["url"]
        assert "HTTP 403 from a signed upload URL" in caplog.text
    finally:
        server.stop()


def test_a_403_on_a_signed_url_is_transient_but_a_403_on_the_api_blames_the_token(hub, finished_run):
    """The classification itself: the same status, two causes."""
    with pytest.raises(hub_lib.PushError, match=r"refused \(403\): your token cannot write to 'bob'"):
        hub_lib.push(finished_run, PushTarget("bob/not-yours", token=TOKEN, retries=0))


@pytest.mark.slow
def test_a_push_that_cannot_succeed_ends_within_its_bound_with_the_error_last_naming_hubtune_push(
        hub, two_class_folder, tmp_path):
    """A Hub that answers 500 to every upload, through README's launch command with --push-every-save: training
    ends, the run's export is intact, no retry starts after HUBTUNE_PUSH_TIMEOUT, and the last line the user sees
    is the error, naming the command that completes the push."""
    import time

    from faultproxy import FaultProxy

    target, out = unique("never"), tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "-q", "hubtune/train.py", "--model",
           "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32", "--epochs", "1",
           "--batch-size", "16", "--num-workers", "0", "--max-bad-fraction", "0.05", "--output-dir", str(out),
           "--push-to-hub", target, "--push-every-save", "--report-to", "none"]
    with FaultProxy(hub.url) as proxy:
        failing = proxy.fail("PUT", r"/upload/", status=500, times=None)
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env_for(proxy.url, tmp_path / "home", HUBTUNE_PUSH_TIMEOUT="10",
                                          HUBTUNE_HUB_RETRY_WAIT="0.5"))
        took = time.monotonic() - started
    assert proc.returncode == 1 and failing.applied >= 1, proc.stderr[-3000:]
    lines = [line.removeprefix("[RANK 0] ") for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("hubtune: error: push to "), proc.stderr[-3000:]
    assert f"complete the push with: hubtune push {out} {target}" in lines[-1]
    assert sum(line.startswith("hubtune: error") for line in lines) == 1 and "Traceback" not in proc.stderr
    assert "it/s]" not in proc.stderr and "\r" not in proc.stderr  # no progress bars in a log
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    # the background push cancelled (≤ 30 s), then the final push: attempts until 10 s, the last ends within the
    # client's own retries of one file (about 25 s); training itself takes seconds
    assert took < 150, took


@pytest.mark.slow
def test_every_entry_point_gives_up_on_a_hub_that_hangs_with_one_line(hub, tmp_path):
    """A Hub that accepts connections and never answers: `from_pretrained`, `predict REPO`, `prefetch`, `reproduce`
    and `evaluate` each end with one error line naming the Hub and the timeout, whatever call they make first
    (HfApi's info calls pass `timeout=None`, hf_hub_download retries with its own 60 s timeout: both bounded)."""
    import time

    from faultproxy import FaultProxy
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    python = [sys.executable, "-c", "from hubtune.errors import run_guarded; from hubtune import ImageClassifier; "
              "raise SystemExit(run_guarded(lambda: ImageClassifier.from_pretrained('alice/m')))"]
    cli = [sys.executable, "-m", "hubtune.cli"]
    commands = {"from_pretrained": python, "predict": cli + ["predict", "alice/m", str(image)],
                "prefetch": cli + ["prefetch", "--model", "alice/m"],
                "reproduce": cli + ["reproduce", "alice/m", "--dry-run"],
                "evaluate": cli + ["evaluate", "alice/m", "--dataset", "alice/d"]}
    with FaultProxy(hub.url) as proxy:
        hung = proxy.hold("*", r"/", timeout=240, times=None)
        started = time.monotonic()
        procs = {name: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env_for(proxy.url, tmp_path / name, HUBTUNE_HUB_TIMEOUT="2"))
                 for name, cmd in commands.items()}
        results = {name: (proc.communicate(timeout=230)[1], proc.returncode) for name, proc in procs.items()}
        took = time.monotonic() - started
        hung.release()
    assert took < 200, took  # the server held every request for 240 s: each one gave up on its own
    for name, (stderr, code) in results.items():
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 1 and lines and lines[-1].startswith("hubtune: error: "), (name, stderr[-2000:])
        assert f"the Hub at {proxy.url} could not be reached" in lines[-1] and "HUBTUNE_HUB_TIMEOUT 2s" in lines[-1]
        assert "Traceback" not in stderr, (name, stderr[-2000:])
