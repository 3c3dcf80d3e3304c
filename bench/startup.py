"""Benchmark 6: time to first step (import + model + data setup + first step) and `hubtune predict` latency.

Time to first step: wall time from spawning `python -m hubtune.train ...` to its `step 1 |` log line, against the
plain Accelerate loop script (bench/accelerate_loop.py) with the same model, data, resolution, batch and workers
printing `step 1`. The child is killed once the line appears. Predict: wall time of the `hubtune predict DIR
IMAGE` process against a minimal timm script doing the same (load local-dir model, eval transform, softmax top-1);
and the in-process latency of a warm `ImageClassifier.predict(path)` against the same plain timm calls.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench import data as bench_data
from bench.common import REPO, Context, alternate, benchmark, row

FIRST_STEP = re.compile(r"(?:^|\] )step 1\b")
TIMM_PREDICT = """
import sys, torch, timm
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
with torch.inference_mode():
    probs = model(tf(Image.open(sys.argv[2]).convert("RGB")).unsqueeze(0)).softmax(-1)
score, index = probs.topk(1)
print(f"{sys.argv[2]}: {model.pretrained_cfg['label_names'][index.item()]} ({score.item():.4f})")
"""


def until_first_step(cmd: list[str], timeout: float = 300) -> float:
    """Seconds from spawning `cmd` to its first-step line; the process (and its loader workers) is then killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if FIRST_STEP.search(line):
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                break
        raise RuntimeError(f"no first step from {' '.join(cmd)}:\n{''.join(lines[-30:])}")
    finally:
        # its loader workers die unreaped (orphans): book their CPU time as ours, not as other people's jobs
        common.UNREAPED_CPU_S += common._descendants_cpu(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: the child and its workers
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return elapsed


def wall_failing(cmd: list[str], code: int = 2) -> float:
    """Seconds `cmd` takes to refuse its arguments (exit `code`: a mistyped flag)."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if out.returncode != code or "did you mean" not in out.stderr:
        raise RuntimeError(f"{' '.join(cmd)} did not refuse a mistyped flag with a suggestion:\n{out.stderr[-3000:]}")
    return elapsed


def model_dir(out: Path) -> Path:
    """resnet18 with 2 labelled classes in timm's Hub format, written by hubtune."""
    import timm

    from hubtune.classifier import ImageClassifier

    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    net.pretrained_cfg = {**net.pretrained_cfg, "label_names": ["cat", "dog"]}
    return ImageClassifier(net, device="cpu").save_pretrained(out)


def test_image(out: Path) -> Path:
    import numpy as np

    noise, tex = bench_data._textures(0)
    path = out / "cat.jpg"
    path.write_bytes(bench_data.photo(np.random.default_rng(1), (500, 375), noise, tex))
    return path


def warm_latency(fn: Any, calls: int) -> float:
    """Median seconds per call after 2 warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@benchmark("startup")
def run(ctx: Context) -> dict:
    import timm
    import torch
    from PIL import Image

    from hubtune.classifier import ImageClassifier

    n, shards, image_size, batch_size = ctx.pick((64, 2, 64, 8), (2400, 8, 160, 32))
    root = bench_data.dataset(n, shards)
    from bench.accelerate_loop import make_loader

    make_loader(bench_data.files(root), lambda x: x, 1, 0)  # the comparison's Arrow cache, built once beforehand
    py = sys.executable
    counter = iter(range(10**6))
    sizes = ["--image-size", str(image_size), "--batch-size", str(batch_size)]

    def hub_cmd() -> list[str]:
        return [py, "-m", "hubtune.train", "--model", "resnet18", "--no-pretrained", "--dataset", str(root),
                "--num-workers", "2", "--log-every", "1", "--no-progress", "--epochs", "1", "--max-steps", "2",
                "--val-fraction", "0.05", "--output-dir", str(ctx.scratch / f"run-{next(counter)}"), *sizes]

    acc_cmd = [py, "bench/accelerate_loop.py", "--data", str(root), "--steps", "1", "--num-workers", "2", *sizes]
    # quick: hubtune's side only (every child process spends seconds importing torch)
    full = not ctx.quick
    first = alternate(ctx.reps, {"hubtune": lambda: until_first_step(hub_cmd()),
                                 **({"accelerate": lambda: until_first_step(acc_cmd)} if full else {})},
                      ctx.log, "first step")

    typo = ["hubtune/train.py", "--freze", "stem"]  # answered before torch is imported (train.py's __main__ block)
    help_s = alternate(ctx.reps, {
        "hubtune": lambda: wall_failing([py, *typo]),
        # the launcher exits 1 for any failure of its script; quick: hubtune's side only
        **({"launcher": lambda: wall_failing([str(Path(py).with_name("accelerate")), "launch", "-q", *typo], 1)}
           if full else {}),
    }, ctx.log, "mistyped flag")

    folder = model_dir(ctx.scratch / "model")
    image = test_image(ctx.scratch)
    cli = alternate(ctx.reps, {
        "hubtune": lambda: wall([py, "-m", "hubtune.cli", "predict", str(folder), str(image)]),
        **({"timm": lambda: wall([py, "-c", TIMM_PREDICT, str(folder), str(image)])} if full else {}),
    }, ctx.log, "predict CLI")

    clf = ImageClassifier.from_pretrained(folder, device="cpu")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def plain_predict() -> Any:
        with torch.inference_mode():
            return model(tf(Image.open(image).convert("RGB")).unsqueeze(0)).softmax(-1).topk(1)

    calls = ctx.pick(3, 20)
    warm = alternate(ctx.reps, {"hubtune": lambda: warm_latency(lambda: clf.predict(image), calls),
                                "timm": lambda: warm_latency(plain_predict, calls)}, ctx.log, "predict warm")
    ms = {k: {**v, **{s: v[s] * 1e3 for s in ("median", "min", "max")}, "values": [x * 1e3 for x in v["values"]]}
          for k, v in warm.items()}
    rows = [
        row("time to first training step (process start to `step 1`)", "s", first["hubtune"], first.get("accelerate"),
            comparison_name="plain Accelerate loop script", higher_is_better=False),
        row("a mistyped flag answered with `did you mean` (`python hubtune/train.py --freze stem`)", "s",
            help_s["hubtune"], help_s.get("launcher"), comparison_name="the same through `accelerate launch -q`",
            higher_is_better=False),
        row("`hubtune predict DIR IMAGE`, one image, process wall time", "s", cli["hubtune"], cli.get("timm"),
            comparison_name="minimal timm script", higher_is_better=False),
        row("ImageClassifier.predict(path), one image, warm, in process", "ms", ms["hubtune"], ms["timm"],
            comparison_name="timm model + transform, same calls", higher_is_better=False),
    ]
    return {"rows": rows,
            "params": {"model": "resnet18", "train_image_size": image_size, "batch_size": batch_size,
                       "num_workers": 2, "images": n, "predict_image": "500x375 JPEG", "predict_size": 224,
                       "reps": ctx.reps, "warm_calls_per_rep": calls},
            "details": {"first_step": first, "mistyped_flag_s": help_s, "predict_cli_s": cli, "predict_warm_ms": ms}}
