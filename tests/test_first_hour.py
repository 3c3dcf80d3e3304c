"""A newcomer's first hour: problems found before training, all at once; suggestions for typos; help before torch
loads; logs without noise that contradicts the run; EMA that warns when it cannot work."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hubtune import preflight
from hubtune.config import TrainConfig
from hubtune.hub import PushTarget

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LAUNCH = [ACCELERATE, "launch", "-q", "hubtune/train.py"]  # README's command line
HUBTUNE = [sys.executable, "-m", "hubtune.cli"]


def run(args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def flags(dataset, out, *extra):
    return ["--model", "test_resnet", "--no-pretrained", "--dataset", str(dataset), "--image-size", "32",
            "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--max-bad-fraction", "0.05",
            "--output-dir", str(out), "--no-progress", "--report-to", "none", *extra]


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


@pytest.mark.slow
def test_a_run_that_could_not_push_lists_it_with_every_other_problem_before_training(hub, tmp_path):
    """No token, a missing dataset and an --output-dir that is a file: one run, three problems, nothing trained."""
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps")
    proc = run(LAUNCH + flags(tmp_path / "no-such-photos", taken, "--push-to-hub", "alice/first-hour"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("hubtune: error: 3 problems found before training"))
    listed = lines[start + 1:]
    assert len(listed) == 3 and all(ln.startswith("  ") for ln in listed), lines[start:]
    assert any("--push-to-hub 'alice/first-hour': no Hub token" in ln and "hubtune push OUTPUT_DIR REPO" in ln
               for ln in listed)
    assert any("no-such-photos" in ln and "no such local file or directory" in ln for ln in listed)
    assert any(f"--output-dir {str(taken)!r} is a file" in ln for ln in listed)
    assert "epoch" not in proc.stderr and "parameters:" not in proc.stderr  # nothing was built or trained
    assert taken.read_text() == "a file the user keeps"


@pytest.mark.parametrize(("token", "expected"), [
    ("tok-nobody", "the Hub refuses the token (401: invalid or expired)"),
    ("tok-alice-read", "the token of user 'alice' is read-only; use a write token"),
    ("tok-bob-write", "user 'bob' cannot create or write repos in 'alice' (they can in: 'bob')"),
])
def test_a_token_that_cannot_write_is_named_before_training(hub, monkeypatch, token, expected):
    monkeypatch.setenv("HF_TOKEN", token)
    problems = preflight.write_access(PushTarget("alice/first-hour"), hub_checkpoints=True)
    assert len(problems) == 1
    message = str(problems[0])
    assert message.startswith("--push-to-hub 'alice/first-hour' with --hub-checkpoints: ") and expected in message
    assert "hubtune push OUTPUT_DIR REPO" in message or "bob" in message


def test_a_token_that_can_write_passes(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok-alice-write")
    assert preflight.write_access(PushTarget("alice/first-hour")) == []
    assert preflight.write_access(PushTarget("first-hour")) == []  # created in the token's namespace
    assert preflight.write_access(PushTarget("Alice/first-hour")) == []  # namespaces ignore case
    assert preflight.write_access(None) == []  # nothing to push, nothing to check


@pytest.mark.slow
def test_a_hub_that_does_not_answer_is_one_line_before_training(two_class_folder, tmp_path):
    """A dead endpoint (nothing listens on the port) for a Hub dataset: one line, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = run(HUBTUNE + ["train", *flags("someone/photos", tmp_path / "out")],
               env_extra={"HF_ENDPOINT": dead, "HUBTUNE_HUB_TIMEOUT": "2", "HUBTUNE_HUB_RETRIES": "0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = error_lines(proc)[-1]
    assert last.startswith("hubtune: error: --dataset 'someone/photos': the Hub at " + dead)
    assert "could not be reached" in last and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(two_class_folder, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
    proc = run(HUBTUNE + ["train", *flags(two_class_folder, small_disk / "out", "--model-ema")])
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = error_lines(proc)[-1]
    assert last.startswith(f"hubtune: error: --output-dir {str(small_disk / 'out')!r}: 0.")
    assert "MiB free on its disk, one checkpoint of this run needs about" in last
    assert not (small_disk / "out").exists() and filler.exists()


def test_problems_are_listed_one_under_another_with_their_own_lines_indented_under_them():
    from hubtune.errors import ConfigError, HubtuneError, OutputDirError, Problems, PushError

    found = Problems()
    for err in (PushError("no token"), ConfigError("two freeze problems:\nfirst\nsecond"), OutputDirError("a file")):
        with found.check():
            raise err
    with pytest.raises(HubtuneError) as caught:  # not every one is a usage error: exit code 1
        found.raise_all("before training")
    assert type(caught.value) is HubtuneError
    assert str(caught.value).splitlines() == ["3 problems found before training:", "  no token",
                                              "  two freeze problems:", "    first", "    second", "  a file"]
    only = Problems()
    with only.check():
        raise OutputDirError("a file")
    with pytest.raises(OutputDirError, match="^a file$"):  # one problem: raised as it is
        only.raise_all("before training")


@pytest.mark.slow
def test_typos_get_the_closest_flag_command_or_value_and_the_subcommands_help():
    cases = [
        ([sys.executable, "-m", "hubtune.train", "--freze", "stem"],
         "unrecognized arguments: --freze stem; did you mean --freeze? (see `hubtune train --help`)"),
        (HUBTUNE + ["train", "--optimizer", "adamww"], "expected one of adamw, adam, sgd, momentum, lamb, lion, adan, "
                                                       "rmsprop; did you mean adamw?"),
        (HUBTUNE + ["trian"], "invalid choice: 'trian' (choose from train, summary"),
        (HUBTUNE + ["predict", "--topk", "3", "m", "x.jpg"],
         "unrecognized arguments: --topk; did you mean --top-k? (see `hubtune predict --help`)"),
    ]
    for args, expected in cases:
        proc = run(args)
        assert proc.returncode == 2, proc.stderr
        assert expected in error_lines(proc)[-1], proc.stderr
    assert "did you mean train?" in run(HUBTUNE + ["trian"]).stderr


@pytest.mark.slow
def test_a_mistyped_yaml_key_gets_a_suggestion(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 2\nbatch_sise: 8\n")
    proc = run([sys.executable, "-m", "hubtune.train", "--config", str(config)])
    assert proc.returncode == 2
    assert "unknown key 'batch_sise' (did you mean batch_size?)" in proc.stderr


def test_help_and_flag_errors_answer_before_torch_is_imported():
    """What makes them fast (timings: bench/startup.py): torch, timm, accelerate and datasets are not imported."""
    for args in (["--help"], ["--freze", "stem"]):
        proc = run([sys.executable, "-X", "importtime", "-m", "hubtune.train", *args])
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
        assert imported and not imported & {"torch", "timm", "accelerate", "datasets"}, sorted(imported)[:20]


@pytest.mark.slow
def test_readme_launch_after_accelerate_config_default_has_no_contradicting_warning_and_uses_its_precision(
        two_class_folder, tmp_path):
    """README: `accelerate config default` once; the launcher's --mixed_precision is the run's unless the flag is
    given; one process logs without [RANK 0]."""
    home = {"HF_HOME": str(tmp_path / "home")}
    assert run([ACCELERATE, "config", "default"], env_extra=home).returncode == 0
    out = tmp_path / "out"
    proc = run([ACCELERATE, "launch", "-q", "--mixed_precision", "bf16", "hubtune/train.py",
                *flags(two_class_folder, out, "--max-steps", "2")], env_extra=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in proc.stderr
    assert "[RANK" not in proc.stderr and "saved checkpoint" in proc.stderr
    assert yaml.safe_load((out / "train_config.yaml").read_text())["mixed_precision"] == "bf16"
    # the command the card records (and an interrupted run prints) trains as this run did, whatever launches it
    command = json.loads((out / "metrics.json").read_text())["run_info"]["command"]
    assert command.startswith("accelerate launch -q hubtune/train.py ") and "--mixed-precision bf16" in command


def test_a_launcher_precision_hubtune_does_not_support_is_one_line():
    import torch

    from hubtune.errors import ConfigError
    from hubtune.job import resolve_device_settings

    with pytest.raises(ConfigError, match=r"mixed precision 'fp8' \(from accelerate launch --mixed_precision or "
                                          r"`accelerate config`\) is not supported; use one of no, bf16, fp16"):
        resolve_device_settings(TrainConfig(), torch.device("cpu"), "fp8")


@pytest.mark.slow
def test_ema_that_cannot_average_over_a_short_run_warns_and_the_card_names_the_exported_weights(
        two_class_folder, tmp_path):
    out = tmp_path / "ema"
    proc = run(HUBTUNE + ["train", *flags(two_class_folder, out, "--model-ema", "--max-steps", "3")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--model-ema-decay 0.9998 averages over about 5,000 optimizer steps, but this run has about 3: the EMA "
            "weights would stay close to the starting ones. Add --model-ema-warmup") in proc.stderr
    card = (out / "README.md").read_text()
    assert "**EMA weights:**" in card or "**Training weights:** the run also kept an exponential moving" in card
    quiet = run(HUBTUNE + ["train", *flags(two_class_folder, tmp_path / "warm", "--model-ema", "--model-ema-warmup",
                                           "--max-steps", "3")])
    assert quiet.returncode == 0 and "averages over about" not in quiet.stderr
