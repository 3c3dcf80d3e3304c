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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hubtune
from hubtune.demo.child import RESULT_PREFIX
from hubtune.demo.children import DEMO_USER, Children, child_pids, signal_group
from hubtune.demo.narration import say, step
from hubtune.errors import DemoError

BACKBONE_REPO = f"{DEMO_USER}/tiny-texture-resnet"
DATASET_REPO = f"{DEMO_USER}/synthetic-cats-vs-dogs"
MODEL_REPO = f"{DEMO_USER}/cats-vs-dogs-finetuned"
MIN_ACCURACY = 0.9
SEED = 0
MARKER = ".hubtune-demo"  # marks a workdir the demo created and may clean
SUMMARY_FILE = "demo_summary.json"
# what the demo writes in its workdir; a rerun deletes exactly these
ENTRIES = ("hub", "backbone", "run", "heldout", "hf_home", SUMMARY_FILE)
REAL_HUB_COMMAND = "accelerate launch hubtune/train.py --config examples/cats_vs_dogs.yaml --push-to-hub you/name"
SIGTERM_GRACE_S = 120  # a run that has not saved and exited by then is killed


@dataclass(frozen=True)
class DemoSize:
    images: int  # size of the generated dataset
    pretrain_steps: int  # backbone pre-training steps (batch 64, 32 px)
    epochs: int  # fine-tuning epochs
    heldout: int  # images generated with another seed for the final predictions


FULL = DemoSize(images=800, pretrain_steps=800, epochs=3, heldout=12)
QUICK = DemoSize(images=400, pretrain_steps=250, epochs=2, heldout=8)



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
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no", str(Path(hubtune.__file__).parent / "train.py")]
    return launch + [
        "--model", BACKBONE_REPO, "--dataset", DATASET_REPO, "--image-size", "48", "--epochs", str(size.epochs),
        "--batch-size", "32", "--lr", "3e-3", "--val-fraction", "0.2", "--freeze", "stem,stages.0", "--freeze-bn",
        "--mixed-precision", "bf16", "--save-every", "epoch", "--output-dir", str(workdir / "run"),
        "--num-workers", "0", "--log-every", "5", "--no-progress", "--seed", str(SEED),
    ]


def train_and_interrupt(children: Children, cmd: list[str], home: Path) -> dict[str, Any]:
    """Run `cmd`; after its first checkpoint, SIGTERM the job's process group; return what the run reported.

    `accelerate launch` does not forward signals to train.py, so the whole process group is signalled, as a
    scheduler does on preemption: the launcher exits at once, train.py saves a checkpoint and exits with 143.

    Raises:
        DemoError: the run failed, finished before the signal, or did not report the checkpoint it saved.
    """
    state: dict[str, Any] = {"first_checkpoint": None, "train_pid": None, "timer": None}

    def on_line(line: str, proc: subprocess.Popen) -> None:
        m = re.match(r"saved checkpoint (step-\d+)", line)
        if m and state["first_checkpoint"] is None:
            state["first_checkpoint"] = m.group(1)
            kids = child_pids(proc.pid)
            state["train_pid"] = kids[0] if len(kids) == 1 else None
            say(f">>> demo: first checkpoint {m.group(1)} is on disk: sending SIGTERM to the training job, as a "
                 "cluster scheduler does on preemption. train.py saves at the next step boundary and exits.")
            signal_group(proc.pid, signal.SIGTERM)
            state["timer"] = threading.Timer(SIGTERM_GRACE_S, signal_group, (proc.pid, signal.SIGKILL))
            state["timer"].daemon = True
            state["timer"].start()

    code, lines = children.run(cmd, home, on_line)
    if state["timer"] is not None:
        state["timer"].cancel()
    train_code = None
    if state["train_pid"] is not None:
        try:  # train.py was adopted by this process when its launcher exited (see _become_subreaper)
            train_code = os.waitstatus_to_exitcode(os.waitpid(state["train_pid"], 0)[1])
        except ChildProcessError:
            pass
    message = next((ln for ln in lines if "SIGTERM received: saved" in ln), None)
    m = re.search(r"saved (\S+); resume with: (.*)$", message or "")
    if state["first_checkpoint"] is None or m is None:
        raise _failure("the first training run did not stop on SIGTERM with a checkpoint", code, lines)
    return {"signal": "SIGTERM", "after_checkpoint": state["first_checkpoint"], "saved": Path(m.group(1)).name,
            "resume_command": m.group(2), "train_exit_code": train_code, "launcher_exit_code": code,
            "message": message.removeprefix("hubtune: ")}


def train_resumed(children: Children, cmd: list[str], home: Path) -> dict[str, Any]:
    """Rerun `cmd` with --resume latest and --push-to-hub; return where it resumed and the pushed commit."""
    code, lines = children.run(cmd + ["--resume", "latest", "--push-to-hub", MODEL_REPO], home)
    text = "\n".join(lines)
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), step (\d+)", text)
    pushed = re.search(r"pushed \d+ files to (\S+) \(verified", text)
    if code != 0 or resumed is None or pushed is None:
        raise _failure("the resumed training run failed, or did not resume and push", code, lines)
    return {"resumed": True, "resumed_from": resumed.group(1), "resumed_from_epoch": int(resumed.group(2)),
            "resumed_from_step": int(resumed.group(3)), "commit_url": pushed.group(1)}


def publish(children: Children, workdir: Path, size: DemoSize) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hubtune.demo.child", "publish", "--workdir", str(workdir),
           "--backbone-repo", BACKBONE_REPO, "--dataset-repo", DATASET_REPO, "--images", str(size.images),
           "--pretrain-steps", str(size.pretrain_steps), "--seed", str(SEED)]
    return _result(*children.run(cmd, workdir / "hf_home" / "publish"), "publishing the backbone and dataset")


def predict_fresh(children: Children, workdir: Path, size: DemoSize) -> list[dict[str, Any]]:
    """Write held-out images (another seed) and classify them in a child with an empty cache and no token."""
    from hubtune.demo.data import CLASSES, animals

    (workdir / "heldout").mkdir()
    paths, truths = [], []
    for i, (data, label) in enumerate(animals(size.heldout, seed=SEED + 1000)):
        paths.append(workdir / "heldout" / f"{i:02d}_{CLASSES[label]}.jpg")
        paths[-1].write_bytes(data)
        truths.append(CLASSES[label])
    cmd = [sys.executable, "-m", "hubtune.demo.child", "predict", MODEL_REPO, *map(str, paths)]
    loaded = _result(*children.run(cmd, workdir / "hf_home" / "fresh", token=None), "loading the pushed model")
    return [{"image": str(p), "truth": t, "hubtune": ours, "timm": theirs, "revision": loaded["revision"]}
            for p, t, ours, theirs in zip(paths, truths, loaded["hubtune"], loaded["timm"])]


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
         f"a checkpoint every epoch. This is `accelerate launch hubtune/train.py ...` with this Python:\n"
         f"$ {shlex.join(cmd)}")
    interrupt = timed("train_interrupted", train_and_interrupt, children, cmd, home)
    code = interrupt["train_exit_code"]
    exited = f"exited with code {code}" if code is not None else "exited"
    say(f">>> demo: train.py saved {interrupt['saved']}, {exited} and printed how to resume. Rerunning the same "
         f"command with --resume latest, and --push-to-hub to publish at the end:\n"
         f"$ {shlex.join(cmd)} --resume latest --push-to-hub {MODEL_REPO}")
    resumed = timed("train_resumed", train_resumed, children, cmd, home)

    step(4, "The result")
    out = workdir / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best"]
    plots = sorted(str(p) for p in (out / "plots").glob("*.png"))
    checkpoints = sorted(str(p) for p in (out / "checkpoints").glob("step-*"))
    say(f"The resumed run went on from step {resumed['resumed_from_step']} (epoch {resumed['resumed_from_epoch']}), "
         f"finished {len(metrics['history'])} epochs, exported the best checkpoint ({best.get('checkpoint')}, epoch "
         f"{best['epoch']}, val_accuracy {best['val_accuracy']:.4f}), wrote the model card with {len(plots)} plots "
         f"and pushed it all in one verified commit:\n  {resumed['commit_url']}\n"
         f"  model card   {out / 'README.md'}\n  plots        {', '.join(plots)}\n"
         f"  checkpoints  {', '.join(Path(p).name for p in checkpoints)} in {out / 'checkpoints'}\n"
         f"  metrics      {out / 'metrics.json'}\n  Hub storage  {workdir / 'hub'}")

    step(5, "Loading the pushed model in a clean process (empty HF cache, no token)")
    say(f"hubtune.ImageClassifier.from_pretrained({MODEL_REPO!r}) and plain timm.create_model('hf-hub:{MODEL_REPO}', "
         f"pretrained=True), on {size.heldout} held-out images generated with another seed:")
    predictions = timed("predict", predict_fresh, children, workdir, size)
    say(f"  {'image':<12} {'truth':<6} {'hubtune':<15} {'plain timm':<15}")
    for p in predictions:
        ours, theirs = p["hubtune"], p["timm"]
        say(f"  {Path(p['image']).name:<12} {p['truth']:<6} {ours['label']} {ours['score']:<10.6f} {theirs['label']} "
             f"{theirs['score']:<10.6f} {'ok' if ours['label'] == p['truth'] else 'WRONG'}")
    return {
        "val_accuracy": best["val_accuracy"], "min_accuracy": MIN_ACCURACY, "epochs": len(metrics["history"]),
        "best": {k: best.get(k) for k in ("epoch", "step", "checkpoint", "val_accuracy", "val_loss", "val_f1")},
        **resumed, "interrupt": interrupt, "repo_id": MODEL_REPO, "revision": predictions[0]["revision"],
        "backbone": published["backbone"], "dataset": published["dataset"], "predictions": predictions,
        "loaders_agree": all(p["hubtune"]["label"] == p["timm"]["label"]
                             and abs(p["hubtune"]["score"] - p["timm"]["score"]) <= 1e-5 for p in predictions),
        "heldout_correct": sum(p["hubtune"]["label"] == p["truth"] for p in predictions),
        "heldout_total": len(predictions),
        "paths": {"output_dir": str(out), "model_card": str(out / "README.md"), "plots": plots,
                  "checkpoints": checkpoints, "metrics": str(out / "metrics.json"),
                  "hub_storage": str(workdir / "hub"), "heldout": str(workdir / "heldout")},
        "train_command": shlex.join(cmd), "real_hub_command": REAL_HUB_COMMAND,
    }
