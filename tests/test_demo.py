"""`hubtune demo` end to end, as a newcomer runs it: its own local Hub, publish, an interrupted and resumed fine-tune
through `accelerate launch`, the push, a clean-process load with hubtune, timm and transformers, and what it tells
them to do next (which is then done here, as printed)."""

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import free_port
from huggingface_hub import HfApi, hf_hub_download

from hubtune.demo import (
    DATASET_REPO,
    MARKER,
    MIN_ACCURACY,
    MODEL_REPO,
    SUMMARY_FILE,
    DemoError,
    add_demo_arguments,
    default_workdir,
    prepare_workdir,
)
from hubtune.demo.steps import LAUNCHER_KILL_S, describe_stop
from hubtune.localhub import LocalHub

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 400  # about a minute on 2 idle cores; generous for a loaded CI machine
PROMISED_S = 180  # README: well under 3 minutes on 2 CPU cores
# what a newcomer types: the console script that `pip install -e .` put beside this Python
_SCRIPT = Path(sys.executable).with_name("hubtune")
HUBTUNE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hubtune.cli"]

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 200)


def newcomer_env(**extra: str) -> dict[str, str]:
    """This environment without the tests' HF_* settings (a newcomer has none), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, **extra}


pytestmark = pytest.mark.slow  # every test here reads the one demo run (a minute) or runs parts of it


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `hubtune demo` once, as typed, from an empty folder; (exit code, output, workdir, summary, folder)."""
    base = tmp_path_factory.mktemp("demo")
    cwd, hf_home = base / "checkout", base / "hf_home"
    cwd.mkdir()
    proc = subprocess.Popen(HUBTUNE + ["demo"], cwd=cwd, env=newcomer_env(HF_HOME=str(hf_home)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo stops its running step and its server
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"the demo took over {DEMO_TIMEOUT_S}s; its output:\n{out[-5000:]}")
    workdir = hf_home / "hubtune" / "demo"
    summary_path = workdir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return proc.returncode, out, workdir, summary, cwd


def test_demo_succeeds_narrates_every_step_and_records_timings(demo):
    code, out, _, summary, _ = demo
    assert code == 0, out[-5000:]
    assert summary["ok"] and summary["problems"] == [] and summary["quick"] is False
    for n in range(1, 8):
        assert f"[{n}/7]" in out
    # the exact fine-tuning command is printed before it runs: the real entry point, quiet, bf16, part frozen
    assert "-m accelerate.commands.launch -q --num_processes 1" in out and "hubtune/train.py" in out
    for flag in ("--freeze stem,stages.0 --freeze-bn", "--mixed-precision bf16", "--save-every epoch"):
        assert flag in summary["train_command"] and flag in out
    assert "accelerate launch -q hubtune/train.py --config examples/cats_vs_dogs.yaml --push-to-hub you/name" in out
    timings = summary["timings_s"]
    assert set(timings) == {"publish", "train_interrupted", "train_resumed", "load", "total"}
    steps = [v for k, v in timings.items() if k != "total"]
    assert 0 < sum(steps) <= timings["total"] + 0.05 * len(steps)  # each figure is rounded to 0.1 s


def test_demo_takes_under_three_minutes_and_says_where_the_time_went(demo):
    _, out, _, summary, _ = demo
    total, pretrain = summary["timings_s"]["total"], summary["backbone"]["pretrain_s"]
    assert total < PROMISED_S, f"the demo took {total}s, {pretrain}s of it pre-training the backbone"
    assert pretrain <= summary["timings_s"]["publish"]
    assert re.search(rf"Done in {total:.0f}s \(publish \d+s, of which pre-training the backbone {pretrain:.0f}s;", out)


def test_model_learned_the_task(demo):
    _, _, workdir, summary, _ = demo
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    assert summary["val_accuracy"] == metrics["best"]["val_accuracy"] >= MIN_ACCURACY
    assert len(metrics["history"]) == summary["epochs"] == summary["size"]["epochs"]
    assert metrics["run_info"]["frozen_groups"] and metrics["run_info"]["mixed_precision"] == "bf16"
    # the backbone was pre-trained on another task first, and learned it
    assert summary["backbone"]["pretrain_accuracy"] >= 0.8
    assert summary["backbone"]["pretrain_task"] == ["stripes", "checks", "dots", "rings"]


def test_run_was_interrupted_by_sigterm_and_resumed_from_its_checkpoint(demo):
    _, out, workdir, summary, _ = demo
    stop = summary["interrupt"]
    assert stop["signal"] == "SIGTERM" and "SIGTERM received: saved" in out and "--resume latest" in out
    if stop["train_exit_code"] is not None:  # accelerate < 1.16: the launcher died, the demo adopted train.py
        assert stop["reaped_by"] == "hubtune demo" and stop["train_exit_code"] == 143 and stop["ended_on_its_own"]
    else:  # accelerate 1.16+ forwards the SIGTERM, reaps train.py and exits 143 itself
        assert stop["reaped_by"] == "accelerate launch" and stop["launcher_exit_code"] == 143
        assert stop["ended_on_its_own"] == (stop["train_ended_after_s"] < LAUNCHER_KILL_S)
    assert f"train.py saved {stop['saved']}, printed how to resume and {describe_stop(stop)}." in out
    first, saved = (int(stop[k].removeprefix("step-")) for k in ("after_checkpoint", "saved"))
    assert saved > first  # the signal arrived inside epoch 2: a mid-epoch checkpoint
    assert summary["resumed"] is True and summary["resumed_from_step"] == saved
    assert f"resumed from {workdir / 'run' / 'checkpoints' / stop['saved']}" in out
    assert summary["resumed_from_epoch"] == 2
    assert any(Path(p).name == summary["best"]["checkpoint"] for p in summary["paths"]["checkpoints"])


def test_how_train_py_ended_is_told_as_observed():
    older = {"train_exit_code": 143, "train_ended_after_s": 1.2, "launcher_exit_code": -15, "ended_on_its_own": True}
    assert describe_stop(older) == "exited with code 143"
    reaped = {"train_exit_code": None, "train_ended_after_s": 1.5, "launcher_exit_code": 143, "ended_on_its_own": True}
    assert describe_stop(reaped) == ("ended 1.5s after the signal, on its own, before accelerate launch's 5 s kill; "
                                     "the launcher reaped it and exited with code 143")
    killed = {**reaped, "train_ended_after_s": 5.1, "ended_on_its_own": False}
    assert "possibly killed by accelerate launch" in describe_stop(killed)


def test_pushed_model_loads_in_a_clean_process_and_all_three_libraries_agree(demo):
    _, out, _, summary, _ = demo
    assert summary["repo_id"] == MODEL_REPO
    assert summary["commit_url"].endswith(f"/{MODEL_REPO}/commit/{summary['revision']}")
    assert summary["libraries"] == ["hubtune", "timm", "transformers"]
    preds = summary["predictions"]
    assert len(preds) == summary["heldout_total"] == summary["size"]["heldout"]
    for p in preds:
        assert Path(p["image"]).is_file() and p["truth"] in ("cat", "dog")
        for library in ("timm", "transformers"):
            assert p[library]["label"] == p["hubtune"]["label"]
            assert p[library]["score"] == pytest.approx(p["hubtune"]["score"], abs=1e-5)
    assert summary["loaders_agree"] is True and "hubtune, timm, transformers agree" in out
    correct = sum(p["hubtune"]["label"] == p["truth"] for p in preds)
    assert correct == summary["heldout_correct"] >= 0.75 * len(preds)
    for library in ("hubtune", "timm", "transformers"):
        assert f"{library} snippet: {len(preds)} images classified" in out


def test_hub_holds_the_three_repos_with_honest_cards(demo):
    """The demo's Hub storage, served again, has the backbone, the synthetic dataset and the fine-tuned model."""
    _, _, workdir, summary, _ = demo
    with LocalHub(workdir / "hub") as hub:
        api = HfApi(endpoint=hub.url, token=False)
        assert api.model_info(MODEL_REPO).sha == summary["revision"]
        files = set(api.list_repo_files(MODEL_REPO))
        assert {"config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml"} <= files
        assert any(f.startswith("plots/") for f in files) and not any(f.startswith("checkpoints/") for f in files)
        backbone = api.model_info(summary["backbone"]["repo_id"])
        assert backbone.card_data.license == "apache-2.0"
        info = api.dataset_info(DATASET_REPO)
        assert "synthetic" in info.card_data.tags and info.card_data.dataset_info  # datasets' metadata kept
        card = Path(hf_hub_download(DATASET_REPO, "README.md", repo_type="dataset", endpoint=hub.url, token=False))
        text = card.read_text()
        assert "**Synthetic data.**" in text and "'cat', 'dog'" in text
    assert (workdir / "run" / "README.md").is_file() and summary["paths"]["plots"]


def _what_now(out: str) -> tuple[str, str, str, dict[str, str]]:
    """The serve command, the export line, the predict command and the load snippets, as printed at the end."""
    section = out[out.index("[7/7] What now"):]
    serve = re.search(r"^  (hubtune hub serve .*)$", section, re.MULTILINE).group(1)
    exports = re.search(r"^  (export HF_ENDPOINT=.*)$", section, re.MULTILINE).group(1)
    predict = re.search(r"^  (hubtune predict .*)$", section, re.MULTILINE).group(1)
    parts = re.split(r"^# --- (\w+) ---\n", section, flags=re.MULTILINE)
    return serve, exports, predict, {name: code.strip() + "\n" for name, code in zip(parts[1::2], parts[2::2])}


def test_it_ends_with_what_now_and_every_command_works_as_printed(demo, tmp_path):
    """Serve the Hub again with the printed command, set the printed variables, run the printed code."""
    code, out, workdir, summary, _ = demo
    assert code == 0, out[-5000:]
    serve, exports, predict, snippets = _what_now(out)
    what = summary["what_now"]
    assert (serve, exports, predict) == (what["serve"], what["exports"], what["predict"])
    assert snippets == {k: v.strip() + "\n" for k, v in what["snippets"].items()}
    assert list(snippets) == ["hubtune", "timm", "transformers"]
    assert out.rstrip().endswith(snippets["transformers"].strip())  # the last thing it prints
    assert f"--root {workdir / 'hub'} --user demo-user --port 8765" in serve
    assert exports == "export HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1"
    assert "ImageClassifier.from_pretrained" in snippets["hubtune"]
    assert 'timm.create_model("hf-hub:' in snippets["timm"] and 'pipeline("image-classification"' in snippets[
        "transformers"]

    port = str(free_port())  # 8765 may be taken on a shared machine: what a newcomer would change too
    serve_argv = shlex.split(serve.replace("--port 8765", f"--port {port}"))
    assert serve_argv[:3] == ["hubtune", "hub", "serve"]
    env = newcomer_env(HF_HOME=str(tmp_path / "hf_home"))
    for assignment in shlex.split(exports.replace(":8765", f":{port}"))[1:]:
        key, _, value = assignment.partition("=")
        env[key] = value
    server = subprocess.Popen(HUBTUNE + serve_argv[1:], env=newcomer_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        banner = []
        while not banner or not banner[-1].startswith("# generated a write token"):  # its last banner line
            banner.append(server.stdout.readline())
            assert banner[-1] and len(banner) < 30, banner  # it did not exit, and it printed what it prints
        assert f"export HF_ENDPOINT=http://127.0.0.1:{port}\n" in banner and "demo-user" in banner[-1]
        by_image = {p["image"]: p for p in summary["predictions"]}
        for library, snippet in snippets.items():
            ran = subprocess.run([sys.executable, "-c", snippet], check=False, cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
            assert ran.returncode == 0, f"{library}: {ran.stderr[-3000:]}"
            printed = ast.literal_eval(ran.stdout.strip().splitlines()[-1])
            assert len(printed) == len(by_image)
            for image, pred in zip(sorted(by_image), printed):
                assert pred["label"] == by_image[image][library]["label"]
                assert pred["score"] == pytest.approx(by_image[image][library]["score"], abs=1e-5)
        ran = subprocess.run(HUBTUNE + shlex.split(predict)[1:], check=False, cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr[-3000:]
        for image, pred in by_image.items():  # "IMAGE: LABEL (SCORE)", top 1
            assert f"{image}: {pred['hubtune']['label']} ({pred['hubtune']['score']:.4f})" in ran.stdout
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_output_goes_outside_the_checkout_by_default(demo):
    """Run from a checkout without --workdir, the demo writes under $HF_HOME/hubtune/demo, nothing where it ran."""
    code, out, workdir, summary, cwd = demo
    assert code == 0, out[-5000:]
    assert summary["workdir"] == str(workdir) and list(cwd.iterdir()) == []
    assert (workdir / MARKER).is_file() and f"storing repos under {workdir / 'hub'}" in out
    # and a --workdir hubtune-demo inside a checkout is ignored by git
    ignored = subprocess.run(["git", "check-ignore", "-q", "hubtune-demo/"], check=False, cwd=REPO)
    assert ignored.returncode == 0 or not (REPO / ".git").exists()


def test_no_runtime_warning_from_running_the_child_module(demo):
    """`python -m hubtune.demo.child` is not imported by the package first (runpy would warn and run it twice)."""
    _, out, _, _, _ = demo
    assert "RuntimeWarning" not in out
    ran = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "hubtune.demo.child", "--help"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "RuntimeWarning" not in ran.stderr, ran.stderr


def test_sigterm_mid_training_ends_the_demo_and_every_process_it_started(tmp_path):
    """SIGTERM the demo while train.py runs under accelerate launch: it exits 143, none of its processes lives on."""
    proc = subprocess.Popen(HUBTUNE + ["demo", "--quick", "--workdir", str(tmp_path / "work")], cwd=tmp_path,
                            env=newcomer_env(HF_HOME=str(tmp_path / "hf_home")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(DEMO_TIMEOUT_S, proc.kill)
    watchdog.start()
    lines, tree = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"\| step \d+ \| loss", line):  # train.py is in its loop, under accelerate launch
                tree = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    out = "".join(lines) + rest
    assert len(tree) >= 2, out[-5000:]  # the launcher and train.py at least
    assert proc.returncode == 143, out[-5000:]
    assert "hubtune demo: interrupted; stopping the running step and the local Hub" in out
    assert "received: saved" in out  # train.py saved a checkpoint on the way out
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]


def test_arguments_and_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args([])
    assert (args.workdir, args.quick, args.keep_server) == (None, False, False)
    args = parser.parse_args(["--workdir", "w", "--quick", "--keep-server"])
    assert (args.workdir, args.quick, args.keep_server) == (Path("w"), True, True)
    from huggingface_hub.constants import HF_HOME

    assert default_workdir() == Path(HF_HOME) / "hubtune" / "demo"


def test_workdir_is_reused_only_when_the_demo_made_it(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not empty and was not created by `hubtune demo`"):
        prepare_workdir(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(DemoError, match="is a file"):
        prepare_workdir(foreign / "thesis.tex")
    ours = tmp_path / "ours"
    prepare_workdir(ours)
    (ours / "run" / "checkpoints").mkdir(parents=True)
    (ours / SUMMARY_FILE).write_text("{}")
    (ours / "notes.txt").write_text("kept")
    prepare_workdir(ours)
    assert sorted(p.name for p in ours.iterdir()) == sorted([MARKER, "notes.txt"])
