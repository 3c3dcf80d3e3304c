"""Checkpoints on a Hub branch: a run killed on one machine resumes exactly on another (--hub-checkpoints,
--resume hub), through the real clients and the local Hub, with the server stopped and files corrupted on it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import free_port
from huggingface_hub import HfApi, snapshot_download
from test_checkpoint import assert_same_run, flags

from hubtune import checkpoint, hub_checkpoints
from hubtune import hub as hub_lib
from hubtune.errors import ConfigError
from hubtune.files import CHECKPOINTS_DIR
from hubtune.localhub import LocalHub

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-alice-write"
UPLOADED = "uploaded checkpoint "


def unique(prefix: str, owner: str = "alice") -> str:
    return f"{owner}/{prefix}-{uuid.uuid4().hex[:8]}"


def machine(url: str, home: Path) -> dict:
    """The environment of a fresh machine: its own HF_HOME and cache, the token, the Hub at `url`."""
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_DATASETS_CACHE": str(home / "datasets"), "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "HUBTUNE_HUB_RETRY_WAIT": "0.2"}
    return env


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hubtune.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubtune.cli", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def uploaded(log: str) -> list[str]:
    return [line.split(UPLOADED)[1].split()[0] for line in log.splitlines() if UPLOADED in line]


def sync_processes(out: Path) -> list:
    """The checkpoint sync processes (hubtune.hub_sync) of the run writing to `out`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "hubtune.hub_sync" in cmd and str(out) in cmd:
            found.append(proc)
    return found


def lose_machine(root: Path) -> None:
    """The machine is gone: every process of its runs (the checkpoint sync process too), its output dirs and its
    HF cache."""
    import psutil

    procs = [p for out in root.iterdir() for p in sync_processes(out)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(root)


def branch_checkpoints(repo: str, branch: str = "checkpoints", endpoint: str | None = None) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in HfApi(token=TOKEN, endpoint=endpoint).list_repo_files(repo, revision=branch):
        if f.startswith("checkpoints/"):
            _, name, file = f.split("/")
            found.setdefault(name, set()).add(file)
    return found


def assert_branch_is_the_retention_and_main_only_the_export(repo: str, out: Path) -> None:
    on_hub = branch_checkpoints(repo)
    assert sorted(on_hub) == [p.name for p in checkpoint.listing(out)]
    for name, files in on_hub.items():
        assert files == {p.name for p in (out / CHECKPOINTS_DIR / name).iterdir()}, name
    api = HfApi(token=TOKEN)
    assert not any(f.startswith("checkpoints/") for f in api.list_repo_files(repo))
    assert not any(c.title.startswith("hubtune checkpoint") for c in api.list_repo_commits(repo))
    assert {"model.safetensors", "README.md", "metrics.json"} <= set(api.list_repo_files(repo))


@pytest.fixture(scope="module")
def reference(two_class_folder, tmp_path_factory):
    """The uninterrupted run (nothing pushed: uploading does not change what is trained)."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "hubtune.cli", "train", *flags(two_class_folder, out,
                                                                                   "--num-workers", "1")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_run_killed_on_one_machine_resumes_exactly_on_another(sig, hub, two_class_folder, reference, tmp_path):
    repo = unique("preempted")
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--num-workers", "1", "--push-to-hub", repo, "--hub-checkpoints"]
    proc = start(flags(two_class_folder, a / "out", *args), machine(hub.url, a / "hf"))
    # SIGKILL once two checkpoints are on the Hub; SIGTERM at a step after the first one is (it saves and uploads
    # its own checkpoint before exiting)
    wanted = 2 if sig == signal.SIGKILL else 1
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if len(uploaded("".join(seen))) >= wanted and (sig == signal.SIGKILL or " | loss " in line):
            if sig == signal.SIGKILL:  # the machine is lost: its checkpoint sync process goes with the trainer
                for sync in sync_processes(a / "out"):
                    sync.kill()
            proc.send_signal(sig)
            break
    log = "".join(seen) + proc.stderr.read()
    code = proc.wait(timeout=300)
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), log[-3000:]
    if sig == signal.SIGTERM:
        saved = log.split("SIGTERM received: saved ")[1].split("step-")[1][:6]
        assert f"uploaded to {repo}@checkpoints: on another machine, resume with: " in log
        told = next(line for line in log.splitlines() if "SIGTERM received" in line)
        assert told.rstrip().endswith("--resume hub"), told
    lose_machine(a)

    done = run(flags(two_class_folder, b / "out", *args, "--resume", "hub"), machine(hub.url, b / "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = done.stderr.split("--resume: downloaded ")[1].split()[0]
    assert resumed in uploaded(log)
    if sig == signal.SIGTERM:
        assert resumed == f"step-{saved}"  # the checkpoint saved on the signal is the one resumed
    assert f"resumed from {b / 'out' / 'checkpoints' / resumed}" in done.stderr
    assert "--resume: downloaded the run's TensorBoard files" in done.stderr
    assert_same_run(b / "out", reference)  # weights, EMA, history, and the curves of both machines as one
    assert_branch_is_the_retention_and_main_only_the_export(repo, b / "out")
    assert any(f.startswith("runs/hubtune/events.out.tfevents.")
               for f in HfApi(token=TOKEN).list_repo_files(repo, revision="checkpoints"))
    record = json.loads((b / "out" / "metrics.json").read_text())["hub_checkpoints"]
    assert record["failed"] == [] and record["uploaded"][-1] == checkpoint.listing(b / "out")[-1].name
    card = (b / "out" / "README.md").read_text()
    assert f"are on the branch\n[`checkpoints`](https://huggingface.co/{repo}/tree/checkpoints/checkpoints)" in card
    assert "plus `--resume hub`" in card


@pytest.mark.slow
def test_uploads_fail_while_the_server_is_down_and_resume_after_it_returns(two_class_folder, tmp_path):
    """A requeued job runs the same command from its first attempt on: `--resume hub` with no repo yet starts fresh."""
    port = free_port()
    server = LocalHub(tmp_path / "store", port=port, tokens={TOKEN: ("alice", "write")}).start()
    repo = unique("outage")
    out = tmp_path / "out"
    args = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--max-bad-fraction", "0.05", "--no-progress",
            "--save-every", "3", "--log-every", "1", "--report-to", "none", "--output-dir", str(out),
            "--push-to-hub", repo, "--hub-checkpoints", "--resume", "hub"]
    # one retry: huggingface_hub already retries each file transfer for ~25 s before an attempt fails; the retry
    # lets an upload that started while the server was coming back complete
    env = {**machine(server.url, tmp_path / "hf"), "HUBTUNE_HUB_RETRIES": "1", "HUBTUNE_HUB_RETRY_WAIT": "0.5"}
    proc = start(args, env)
    seen, restarted = [], None
    try:
        for line in proc.stderr:
            seen.append(line)
            if UPLOADED in line and server is not None:
                server.stop()  # the Hub stops answering mid-run
                server = None
            elif "background upload of .upload-" in line and restarted is None:
                restarted = LocalHub(tmp_path / "store", port=port, tokens={TOKEN: ("alice", "write")}).start()
        code = proc.wait(timeout=300)
        # the branch mirrors the retention here, checkpoints superseded while the Hub was down included
        on_hub = branch_checkpoints(repo, endpoint=restarted.url) if restarted is not None else None
    finally:
        for s in (server, restarted):
            if s is not None:
                s.stop()
    log = "".join(seen)
    assert code == 0, log[-3000:]
    assert f"--resume hub: no checkpoint on {repo}@checkpoints yet, starting fresh" in log
    record = json.loads((out / "metrics.json").read_text())["hub_checkpoints"]
    failed = [f["checkpoint"] for f in record["failed"]]
    assert failed and all(f"background upload of .upload-{name} failed" in log for name in failed)
    after = [name for name in record["uploaded"] if name > max(failed)]
    assert after and record["uploaded"][-1] == checkpoint.listing(out)[-1].name  # uploads resumed with the server
    assert restarted is not None
    assert sorted(on_hub) == [p.name for p in checkpoint.listing(out)], log[-3000:]
    assert not list((out / "checkpoints").glob(".hub-sync-*")) and not list((out / "checkpoints").glob(".upload-*"))


@pytest.fixture(scope="module")
def on_the_hub(hub, reference):
    """The reference run's checkpoints on a branch, as --hub-checkpoints leaves them; the newest with a corrupted
    model.safetensors uploaded over it (same size, one byte differs)."""
    repo = unique("damaged")
    names = [p.name for p in checkpoint.listing(reference)]
    hub_lib.push_files(hub_lib.PushTarget(repo, revision="checkpoints", token=TOKEN, commit_message="checkpoints"),
                       {f"checkpoints/{name}/{f.name}": f for name in names
                        for f in (reference / "checkpoints" / name).iterdir()})
    bad = bytearray((reference / "checkpoints" / names[-1] / checkpoint.MODEL_FILE).read_bytes())
    bad[-100] ^= 0xFF
    HfApi(token=TOKEN).upload_file(path_or_fileobj=bytes(bad), path_in_repo=f"checkpoints/{names[-1]}/model.safetensors",
                                   repo_id=repo, revision="checkpoints")
    return repo, names


@pytest.mark.slow
def test_a_corrupted_checkpoint_on_the_hub_is_skipped_and_listed_as_damaged(on_the_hub, tmp_path, monkeypatch,
                                                                            caplog):
    repo, names = on_the_hub
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    got = hub_checkpoints.fetch(hub_checkpoints.HubCheckpoints(repo, "checkpoints"), tmp_path)
    assert got == tmp_path / "checkpoints" / names[-2]
    assert f"skipping {names[-1]} on {repo}@checkpoints" in caplog.text and "damaged" in caplog.text
    assert not (tmp_path / "checkpoints" / names[-1]).exists()
    assert not list((tmp_path / "checkpoints").glob(".download-*"))
    checkpoint.verify(got)
    explicit = hub_checkpoints.parse_resume(f"hf://{repo}@checkpoints/checkpoints/{names[-1]}", None, "checkpoints")
    with pytest.raises(ConfigError, match=f"--resume {repo}@checkpoints/checkpoints/{names[-1]}: cannot use it"):
        hub_checkpoints.fetch(explicit, tmp_path / "explicit")
    listed = subprocess.run([sys.executable, "-m", "hubtune.cli", "checkpoints", f"{repo}@checkpoints"], cwd=REPO,
                            env={**os.environ, "HF_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert sorted(rows) == names
    assert "DAMAGED: model.safetensors differ" in rows[names[-1]] and "latest" in rows[names[-1]]
    assert all("verified" in rows[n] and "DAMAGED" not in rows[n] for n in names[:-1])
    best = json.loads((got / checkpoint.STATE_FILE).read_text())["run_state"]["best"]["checkpoint"]
    assert "best" in rows[best]
    # a branch that does not exist: the error names the command that was run, not a flag it never had
    missing = subprocess.run([sys.executable, "-m", "hubtune.cli", "checkpoints", f"{repo}@no-such-branch"], cwd=REPO,
                             env={**os.environ, "HF_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--resume" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(
        f"hubtune: error: hubtune checkpoints {repo}: no checkpoints at {repo}@no-such-branch")


@pytest.mark.slow
def test_resume_hub_offline_uses_only_the_hf_cache(on_the_hub, tmp_path, monkeypatch):
    import huggingface_hub

    repo, names = on_the_hub
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    where = hub_checkpoints.HubCheckpoints(repo, "checkpoints")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set and these checkpoints are not in the local HF cache"):
        hub_checkpoints.fetch(where, tmp_path / "not-cached")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snapshot_download(repo, revision="checkpoints")  # online, into this machine's HF cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    got = hub_checkpoints.fetch(where, tmp_path / "cached")
    assert got == tmp_path / "cached" / "checkpoints" / names[-2]  # the damaged newest is skipped offline too
    checkpoint.verify(got)


def test_resume_hub_with_nothing_there_starts_fresh_and_an_unreadable_repo_is_an_error(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = HfApi(token=TOKEN)
    empty = unique("no-branch")
    api.create_repo(empty)
    for where in (hub_checkpoints.HubCheckpoints(unique("never-pushed"), "checkpoints"),  # no repo yet
                  hub_checkpoints.HubCheckpoints(empty, "checkpoints")):  # no branch
        assert hub_checkpoints.fetch(where, tmp_path) is None
    api.create_branch(empty, branch="checkpoints")  # a branch without checkpoints
    assert hub_checkpoints.fetch(hub_checkpoints.HubCheckpoints(empty, "checkpoints"), tmp_path) is None
    private = unique("private", owner="bob")
    HfApi(token="tok-bob-write").create_repo(private, private=True)
    with pytest.raises(ConfigError, match=f"no checkpoints at {private}@checkpoints .*your token cannot read it"):
        hub_checkpoints.fetch(hub_checkpoints.parse_resume(f"hf://{private}", None, "checkpoints"), tmp_path)
    with pytest.raises(ConfigError, match="--resume hub resumes from the checkpoints of --push-to-hub REPO"):
        hub_checkpoints.parse_resume("hub", None, "checkpoints")
    with pytest.raises(ConfigError, match="expected hf://ORG/NAME"):
        hub_checkpoints.parse_resume("hf://alice", None, "checkpoints")


@pytest.mark.slow
def test_two_processes_resume_from_the_hub_with_only_the_main_one_downloading(hub, two_class_folder, tmp_path):
    repo = unique("ddp")

    def launch(out: Path, home: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
        args = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size",
                "32", "--epochs", str(epochs), "--batch-size", "8", "--num-workers", "0", "--max-bad-fraction",
                "0.05", "--no-progress", "--report-to", "none", "--output-dir", str(out), "--push-to-hub", repo,
                "--hub-checkpoints", *extra]
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "hubtune/train.py", *args], cwd=REPO, env=machine(hub.url, home),
                              capture_output=True, text=True, timeout=400)

    first = launch(tmp_path / "a", tmp_path / "hf-a", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count(UPLOADED) >= 1
    second = launch(tmp_path / "b", tmp_path / "hf-b", 2, "--resume", "hub")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("--resume: downloaded ") == 1  # the main process; the other read its files
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2] and metrics["num_processes"] == 2
    assert metrics["history"][0] == json.loads((tmp_path / "a" / "metrics.json").read_text())["history"][0]
    assert_branch_is_the_retention_and_main_only_the_export(repo, tmp_path / "b")


def test_hub_checkpoint_settings_that_cannot_work_are_refused_before_training(hub, monkeypatch, two_class_folder,
                                                                             tmp_path):
    from hubtune.config import TrainConfig
    from hubtune.train import train

    base = dict(model="test_resnet", pretrained=False, dataset=str(two_class_folder), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--hub-checkpoints.*--push-to-hub REPO too"):
        TrainConfig(**base, hub_checkpoints=True).validate()
    with pytest.raises(ConfigError, match="--hub-checkpoints-branch.*a branch other than the one the model is pushed"):
        TrainConfig(**base, hub_checkpoints=True, push_to_hub="alice/x", hub_checkpoints_branch="main").validate()
    with pytest.raises(ConfigError, match="--hub-checkpoints-timeout.*a positive number of seconds"):
        TrainConfig(**base, hub_checkpoints=True, push_to_hub="alice/x", hub_checkpoints_timeout=0).validate()
    monkeypatch.setenv("HUBTUNE_HUB_RETRIES", "many")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token can write: what is left to refuse is the retry setting
    with pytest.raises(ConfigError, match="HUBTUNE_HUB_RETRIES='many': expected a whole number"):
        train(TrainConfig(**base, hub_checkpoints=True, push_to_hub="alice/x", epochs=1, progress=False))
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
