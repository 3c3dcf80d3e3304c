"""The steps of `hubtune demo` after the local Hub is up: publish, train and interrupt, resume and push, load."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hubtune
from hubtune.demo.children import DEMO_USER, Children, ExitWatch, child_pids, signal_group
from hubtune.demo.narration import RESULT_PREFIX, say, step
from hubtune.errors import DemoError
from hubtune.files import CARD_FILE, CHECKPOINTS_DIR, METRICS_FILE, PLOTS_DIR, STEP_GLOB
from hubtune.records import RunRecord

BACKBONE_REPO = f"{DEMO_USER}/tiny-texture-resnet"
DATASET_REPO = f"{DEMO_USER}/synthetic-cats-vs-dogs"
MODEL_REPO = f"{DEMO_USER}/cats-vs-dogs-finetuned"
MIN_ACCURACY = 0.9
SEED = 0
MARKER = ".hubtune-demo"  # marks a workdir the demo created and may clean
SUMMARY_FILE = "demo_summary.json"
# what the demo writes in its workdir; a rerun deletes exactly these
ENTRIES = ("hub", "backbone", "run", "heldout", "hf_home", SUMMARY_FILE)
REAL_HUB_COMMAND = "accelerate launch -q hubtune/train.py --config examples/cats_vs_dogs.yaml --push-to-hub you/name"
LIBRARIES = ("hubtune", "timm", "transformers")  # the load snippets, in order (snippets.py)
SIGTERM_GRACE_S = 120  # a run that has not saved and exited by then is killed
LAUNCHER_KILL_S = 5  # accelerate launch 1.16+ SIGKILLs train.py this long after forwarding a SIGTERM to it


@dataclass(frozen=True)
class DemoSize:
    images: int  # size of the generated dataset
    pretrain_steps: int  # backbone pre-training steps (batch 64, 32 px)
    epochs: int  # fine-tuning epochs
    heldout: int  # images generated with another seed for the final predictions


FULL = DemoSize(images=800, pretrain_steps=400, epochs=3, heldout=12)
QUICK = DemoSize(images=400, pretrain_steps=250, epochs=2, heldout=8)


def default_workdir() -> Path:
    """$HF_HOME/hubtune/demo (~/.cache/huggingface/hubtune/demo): beside hubtune's feature cache, not in a checkout."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "hubtune" / "demo"


def prepare_workdir(workdir: Path) -> Path:
    """Create the workdir, or clean what an earlier demo wrote there; refuse a non-empty folder it did not create.

    Raises:
        DemoError: `workdir` is a file, or a non-empty directory without the demo's marker file.
    """
    workdir = workdir.expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--workdir {str(workdir)!r} is a file; give a new or empty directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise DemoError(f"--workdir {str(workdir)!r} is not empty and was not created by `hubtune demo`; "
                        "give a new or empty directory (the demo deletes what it wrote there on a rerun)")
    for name in ENTRIES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by `hubtune demo`; a rerun with this --workdir deletes its outputs\n")
    return workdir


def child_env(hub_env: dict[str, str]) -> dict[str, str]:
    """This process's environment without any HF_* setting, pointed at the local Hub, with quiet progress bars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    package_root = str(Path(hubtune.__file__).resolve().parent.parent)
    env.update(hub_env)
    env.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))})
    return env


def _failure(what: str, code: int, lines: list[str]) -> DemoError:
    tail = "\n".join(lines[-15:])
    return DemoError(f"{what} (exit code {code}); its last output:\n{tail}")


def _result(code: int, lines: list[str], what: str) -> dict[str, Any]:
    """The JSON a `hubtune.demo.child` printed last; DemoError if it failed."""
    found = [ln for ln in lines if ln.startswith(RESULT_PREFIX)]
    if code != 0 or not found:
        raise _failure(f"{what} failed", code, lines)
    return json.loads(found[-1][len(RESULT_PREFIX):])


def train_command(workdir: Path, size: DemoSize) -> list[str]:
    """The fine-tuning command: the real entry point, streaming from the local Hub, part of the backbone frozen."""
    # -q: on failure, train.py's one-line error without the launcher's traceback around it
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no", str(Path(hubtune.__file__).parent / "train.py")]
    return launch + [
        "--model", BACKBONE_REPO, "--dataset", DATASET_REPO, "--image-size", "48", "--epochs", str(size.epochs),
        "--batch-size", "32", "--lr", "3e-3", "--val-fraction", "0.2", "--freeze", "stem,stages.0", "--freeze-bn",
        "--mixed-precision", "bf16", "--save-every", "epoch", "--output-dir", str(workdir / "run"),
        "--num-workers", "0", "--log-every", "5", "--no-progress", "--seed", str(SEED),
    ]


def train_and_interrupt(children: Children, cmd: list[str], home: Path) -> dict[str, Any]:
    """Run `cmd`; after its first checkpoint, SIGTERM the job's process group; return what the run reported.

    The whole group is signalled, as a scheduler does on preemption: train.py saves a checkpoint at the next step
    boundary and exits with 143. Older `accelerate launch` dies at once (the demo then adopts train.py and reads its
    exit code); 1.16+ forwards the signal, reaps train.py and exits with 143 itself, whatever train.py did, so the
    evidence is train.py's own message and that it ended before the launcher would have killed it.

    Raises:
        DemoError: the run failed, finished before the signal, or did not report the checkpoint it saved.
    """
    state: dict[str, Any] = {"first_checkpoint": None, "trainer": None, "timer": None}

    def on_line(line: str, proc: subprocess.Popen) -> None:
        m = re.match(r"saved checkpoint (step-\d+)", line)
        if m and state["first_checkpoint"] is None:
            state["first_checkpoint"] = m.group(1)
            kids = child_pids(proc.pid)
            say(f">>> demo: first checkpoint {m.group(1)} is on disk: sending SIGTERM to the training job's process "
                 "group, as a cluster scheduler does on preemption. train.py saves at the next step boundary and "
                 "exits.")
            state["trainer"] = ExitWatch(kids[0]) if len(kids) == 1 else None
            signal_group(proc.pid, signal.SIGTERM)
            state["timer"] = threading.Timer(SIGTERM_GRACE_S, signal_group, (proc.pid, signal.SIGKILL))
            state["timer"].daemon = True
            state["timer"].start()

    code, lines = children.run(cmd, home, on_line)
    if state["timer"] is not None:
        state["timer"].cancel()
    trainer = state["trainer"]
    if trainer is not None:
        trainer.join(timeout=10)
    message = next((ln for ln in lines if "SIGTERM received: saved" in ln), None)
    m = re.search(r"saved (\S+); resume with: (.*)$", message or "")
    if state["first_checkpoint"] is None or message is None or m is None:
        raise _failure("the first training run did not stop on SIGTERM with a checkpoint", code, lines)
    train_code, ended_s = (trainer.code, trainer.ended_after_s) if trainer is not None else (None, None)
    if train_code is not None:
        on_its_own = train_code == 143
    else:
        on_its_own = code == 143 and ended_s is not None and ended_s < LAUNCHER_KILL_S
    return {"signal": "SIGTERM", "after_checkpoint": state["first_checkpoint"], "saved": Path(m.group(1)).name,
            "resume_command": m.group(2), "message": message.removeprefix("hubtune: "),
            "train_exit_code": train_code, "launcher_exit_code": code, "train_ended_after_s": ended_s,
            "reaped_by": "hubtune demo" if train_code is not None else "accelerate launch",
            "ended_on_its_own": on_its_own}


def describe_stop(stop: dict[str, Any]) -> str:
    """How train.py ended, in words, claiming no more than was observed."""
    if stop["train_exit_code"] is not None:
        return f"exited with code {stop['train_exit_code']}"
    ended = stop["train_ended_after_s"]
    if ended is None:
        return f"exited (its launcher with code {stop['launcher_exit_code']})"
    how = (f"on its own, before accelerate launch's {LAUNCHER_KILL_S} s kill" if stop["ended_on_its_own"]
           else "possibly killed by accelerate launch")
    return (f"ended {ended:.1f}s after the signal, {how}; the launcher reaped it and exited with code "
            f"{stop['launcher_exit_code']}")


def train_resumed(children: Children, cmd: list[str], home: Path) -> dict[str, Any]:
    """Rerun `cmd` with --resume latest and --push-to-hub; return where it resumed and the pushed commit."""
    code, lines = children.run(cmd + ["--resume", "latest", "--push-to-hub", MODEL_REPO], home)
    text = "\n".join(lines)
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), step (\d+)", text)
    pushed = re.search(r"pushed \d+ files? to (\S+) \(verified", text)
    if code != 0 or resumed is None or pushed is None:
        raise _failure("the resumed training run failed, or did not resume and push", code, lines)
    return {"resumed": True, "resumed_from": resumed.group(1), "resumed_from_epoch": int(resumed.group(2)),
            "resumed_from_step": int(resumed.group(3)), "commit_url": pushed.group(1)}


def publish(children: Children, workdir: Path, size: DemoSize) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hubtune.demo.child", "publish", "--workdir", str(workdir),
           "--backbone-repo", BACKBONE_REPO, "--dataset-repo", DATASET_REPO, "--images", str(size.images),
           "--pretrain-steps", str(size.pretrain_steps), "--seed", str(SEED)]
    return _result(*children.run(cmd, workdir / "hf_home" / "publish"), "publishing the backbone and dataset")


def load_fresh(children: Children, workdir: Path, size: DemoSize) -> list[dict[str, Any]]:
    """Write held-out images (another seed); run the load snippets on them in a child with an empty cache, no token."""
    from hubtune.demo.data import CLASSES, animals

    heldout = workdir / "heldout"
    heldout.mkdir()
    truths = {}
    for i, (data, label) in enumerate(animals(size.heldout, seed=SEED + 1000)):
        path = heldout / f"{i:02d}_{CLASSES[label]}.jpg"
        path.write_bytes(data)
        truths[str(path)] = CLASSES[label]
    cmd = [sys.executable, "-m", "hubtune.demo.child", "load", MODEL_REPO, str(heldout)]
    loaded = _result(*children.run(cmd, workdir / "hf_home" / "fresh", token=None), "loading the pushed model")
    return [{"image": image, "truth": truths[image], "revision": loaded["revision"],
             **{library: preds[i] if preds is not None else None for library, preds in loaded["predictions"].items()}}
            for i, image in enumerate(loaded["images"])]


def agree(predictions: list[dict[str, Any]], libraries: list[str]) -> bool:
    """Whether every library that ran gave hubtune's label and score (to 1e-5) for every image."""
    return all(p[lib]["label"] == p["hubtune"]["label"] and abs(p[lib]["score"] - p["hubtune"]["score"]) <= 1e-5
               for p in predictions for lib in libraries)


def run_steps(workdir: Path, size: DemoSize, children: Children, timings: dict[str, float]) -> dict[str, Any]:
    """Steps 2-5, once the server is up; return the machine-readable summary of what they did."""
    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.time()
        result = fn(*args)
        timings[name] = round(time.time() - t0, 1)
        return result

    step(2, "Publishing a pre-trained backbone and a dataset to the local Hub")
    say(f"A backbone that learned something else first, so that transfer and freezing mean something: timm's tiny "
         f"test_resnet, pre-trained for {size.pretrain_steps} steps on 4 synthetic textures (stripes, checks, dots, "
         f"rings), uploaded in timm format as {BACKBONE_REPO}. Then {size.images} generated cat/dog images "
         f"(synthetic, not photos; the card says so) pushed as a parquet dataset {DATASET_REPO}.")
    published = timed("publish", publish, children, workdir, size)

    step(3, "Fine-tuning through the real entry point, interrupted once on purpose")
    cmd, home = train_command(workdir, size), workdir / "hf_home" / "train"
    say(f"Streams {DATASET_REPO} from the Hub, freezes the stem and stages.0 (BatchNorm included), bf16 autocast, "
         f"a checkpoint every epoch. This is `accelerate launch -q hubtune/train.py ...` with this Python:\n"
         f"$ {shlex.join(cmd)}")
    interrupt = timed("train_interrupted", train_and_interrupt, children, cmd, home)
    say(f">>> demo: train.py saved {interrupt['saved']}, printed how to resume and {describe_stop(interrupt)}. "
         f"Rerunning the same command with --resume latest, and --push-to-hub to publish at the end:\n"
         f"$ {shlex.join(cmd)} --resume latest --push-to-hub {MODEL_REPO}")
    resumed = timed("train_resumed", train_resumed, children, cmd, home)

    step(4, "The result")
    out = workdir / "run"
    metrics = RunRecord.from_json(json.loads((out / "metrics.json").read_text()))
    best = metrics.best
    assert best is not None  # the resumed run finished and exported its best checkpoint
    plots = sorted(str(p) for p in (out / PLOTS_DIR).glob("*.png"))
    checkpoints = sorted(str(p) for p in (out / CHECKPOINTS_DIR).glob(STEP_GLOB))
    say(f"The resumed run went on from step {resumed['resumed_from_step']} (epoch {resumed['resumed_from_epoch']}), "
         f"finished {len(metrics.history)} epochs, exported the best checkpoint ({best.checkpoint}, epoch "
         f"{best.epoch}, val_accuracy {best.metrics.accuracy:.4f}), wrote the model card with {len(plots)} plots "
         f"and pushed it all in one verified commit:\n  {resumed['commit_url']}\n"
         f"  model card   {out / CARD_FILE}\n  plots        {', '.join(plots)}\n"
         f"  checkpoints  {', '.join(Path(p).name for p in checkpoints)} in {out / CHECKPOINTS_DIR}\n"
         f"  metrics      {out / METRICS_FILE}\n  Hub storage  {workdir / 'hub'}")

    step(5, "Loading the pushed model in a clean process (empty HF cache, no token)")
    say(f"The three load snippets printed at the end, run as they are: hubtune's ImageClassifier.from_pretrained, "
         f"timm.create_model('hf-hub:{MODEL_REPO}') and transformers' pipeline('image-classification'), on "
         f"{size.heldout} held-out images generated with another seed:")
    predictions = timed("load", load_fresh, children, workdir, size)
    libraries = [lib for lib in LIBRARIES if predictions[0][lib] is not None]
    say(f"  {'image':<12} {'truth':<6} " + " ".join(f"{lib:<19}" for lib in libraries).rstrip())
    for p in predictions:
        cells = " ".join(f"{p[lib]['label']} {p[lib]['score']:<15.6f}" for lib in libraries)
        mark = "ok" if p["hubtune"]["label"] == p["truth"] else "WRONG"
        say(f"  {Path(p['image']).name:<12} {p['truth']:<6} {cells} {mark}")
    return {
        "val_accuracy": best.metrics.accuracy, "min_accuracy": MIN_ACCURACY, "epochs": len(metrics.history),
        "best": {"epoch": best.epoch, "step": best.row.step, "checkpoint": best.checkpoint,
                 "val_accuracy": best.metrics.accuracy, "val_loss": best.metrics.loss, "val_f1": best.metrics.f1},
        **resumed, "interrupt": interrupt, "repo_id": MODEL_REPO, "revision": predictions[0]["revision"],
        "backbone": published["backbone"], "dataset": published["dataset"], "predictions": predictions,
        "libraries": libraries, "loaders_agree": agree(predictions, libraries),
        "heldout_correct": sum(p["hubtune"]["label"] == p["truth"] for p in predictions),
        "heldout_total": len(predictions),
        "paths": {"output_dir": str(out), "model_card": str(out / CARD_FILE), "plots": plots,
                  "checkpoints": checkpoints, "metrics": str(out / METRICS_FILE),
                  "hub_storage": str(workdir / "hub"), "heldout": str(workdir / "heldout")},
        "train_command": shlex.join(cmd), "real_hub_command": REAL_HUB_COMMAND,
    }
