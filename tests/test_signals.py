"""A stopped job's last checkpoint reaches the Hub, whoever sends the SIGTERM: a container runtime to the launcher
(accelerate 1.16+ then SIGKILLs its process tree 5 s later), a scheduler to every process at once, torchrun's agent
to its workers; with a slow Hub (each commit held 5 s by the fault proxy), as `accelerate launch hubtune/train.py`
runs it (README's command line)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from faultproxy import FaultProxy
from test_checkpoint import assert_same_run, flags
from test_hub_checkpoints import (  # noqa: F401 (reference: a fixture)
    branch_checkpoints,
    lose_machine,
    machine,
    reference,
    sync_processes,
    unique,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LAUNCH = [ACCELERATE, "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "hubtune/train.py"]
TORCHRUN = [ACCELERATE, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "hubtune/train.py"]
PLATFORM_GRACE_S = 30  # what Kubernetes, Slurm's KillWait and preemptible VMs allow after SIGTERM


def stop_after_first_checkpoint(cmd: list[str], env: dict, send) -> tuple[int, str, float, Path]:
    """Run `cmd`; at its first saved checkpoint call `send(proc)`; return (exit code, stderr, when the signal was
    sent, the run's output dir)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen, sent = [], None
    for line in proc.stderr:
        seen.append(line)
        if sent is None and "saved checkpoint step-" in line:
            send(proc)
            sent = time.monotonic()
    code = proc.wait(timeout=120)
    assert sent is not None, "".join(seen)[-3000:]
    return code, "".join(seen), sent, Path(cmd[cmd.index("--output-dir") + 1])


def newest(out: Path) -> str:
    """The newest checkpoint of a run stopped by a signal: the one it saved on the signal."""
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))[-1]


def wait_for_sync(out: Path, sent: float) -> float:
    """Wait until the run's checkpoint sync process ends (it outlives the trainer); seconds since the signal."""
    procs = sync_processes(out)
    psutil.wait_procs(procs, timeout=PLATFORM_GRACE_S + 30)
    return time.monotonic() - sent


def assert_one_clean_stop(log: str) -> None:
    assert "Traceback" not in log and "BrokenPipeError" not in log, log[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_launcher_uploads_the_checkpoint_within_the_grace_period_and_resumes_on_another_machine(
        hub, two_class_folder, reference, tmp_path):
    repo = unique("container")
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--num-workers", "1", "--push-to-hub", repo, "--hub-checkpoints"]
    with FaultProxy(hub.url) as proxy:
        slow = proxy.hold("POST", r"/commit/", timeout=5, times=None)  # every commit answered 5 s late
        code, log, sent, out = stop_after_first_checkpoint(
            LAUNCH + flags(two_class_folder, a / "out", *args), machine(proxy.url, a / "hf"),
            lambda proc: proc.send_signal(signal.SIGTERM))  # the launcher alone, as `docker stop` does
        took = wait_for_sync(out, sent)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert slow.applied >= 1
    assert_one_clean_stop(log)
    saved = newest(out)
    assert f"{saved} saved; uploading it to {repo}@checkpoints" in log
    assert saved in branch_checkpoints(repo), (saved, log[-3000:], (out / "checkpoints" / "hub-sync.log").read_text())
    assert took < PLATFORM_GRACE_S, took
    lose_machine(a)

    done = subprocess.run(LAUNCH + flags(two_class_folder, b / "out", *args, "--resume", "hub"), cwd=REPO,
                          env=machine(hub.url, b / "hf"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {b / 'out' / 'checkpoints' / saved}" in done.stderr
    assert_same_run(b / "out", reference)
    lose_machine(b)


@pytest.mark.slow
def test_sigterm_to_every_process_at_once_still_uploads_the_checkpoint(hub, two_class_folder, tmp_path):
    """Slurm at the time limit, a preemptible VM shutting down: the launcher, the trainer, its loader workers and the
    sync process all get SIGTERM at the same instant."""
    repo = unique("slurm")
    args = ["--num-workers", "1", "--epochs", "30", "--push-to-hub", repo, "--hub-checkpoints"]

    def everyone(proc: subprocess.Popen) -> None:
        for sync in sync_processes(tmp_path / "out"):
            sync.send_signal(signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)

    with FaultProxy(hub.url) as proxy:
        proxy.hold("POST", r"/commit/", timeout=5, times=None)
        code, log, sent, out = stop_after_first_checkpoint(
            LAUNCH + flags(two_class_folder, tmp_path / "out", *args), machine(proxy.url, tmp_path / "hf"), everyone)
        took = wait_for_sync(out, sent)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert_one_clean_stop(log)
    assert newest(out) in branch_checkpoints(repo), (out / "checkpoints" / "hub-sync.log").read_text()
    assert took < PLATFORM_GRACE_S, took
    assert not list((out / "checkpoints").glob(".hub-sync-*")) and not list((out / "checkpoints").glob(".upload-*"))
    shutil.rmtree(tmp_path / "hf")


@pytest.mark.slow
def test_sigterm_under_torchrun_uploads_the_checkpoint_of_the_main_process(hub, two_class_folder, tmp_path):
    """Two processes (gloo on CPU) under torchrun's agent: SIGTERM to the launcher, which stops its workers."""
    repo = unique("torchrun")
    args = ["--num-workers", "0", "--epochs", "30", "--push-to-hub", repo, "--hub-checkpoints"]
    with FaultProxy(hub.url) as proxy:
        proxy.hold("POST", r"/commit/", timeout=5, times=None)
        code, log, sent, out = stop_after_first_checkpoint(
            TORCHRUN + flags(two_class_folder, tmp_path / "out", *args), machine(proxy.url, tmp_path / "hf"),
            lambda proc: proc.send_signal(signal.SIGTERM))
        took = wait_for_sync(out, sent)
    assert code != 0
    assert newest(out) in branch_checkpoints(repo), (log[-3000:], (out / "checkpoints" / "hub-sync.log").read_text())
    assert took < PLATFORM_GRACE_S, took
