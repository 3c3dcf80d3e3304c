"""Benchmark: checkpoints on the Hub (--hub-checkpoints, --resume hub) through the local Hub server on loopback.

1. Resume on a new machine: the time from starting `hubtune train ... --resume hub` (empty output dir, empty HF
   cache) to its first training step, against `--resume latest` from a local copy of the same output dir; resnet50
   (2 classes, AdamW: weights, optimizer state and RNG, ~280 MB per checkpoint). The difference is the download
   (listing, transfer, verification against the manifest); the download alone, from the log line that starts it
   to the one that reports it verified, gives MB/s.
2. Training throughput while uploads run: resnet18 full fine-tune fp32 saving a checkpoint every few steps, with
   `--hub-checkpoints` on and off (both save; only one uploads), timed from the arrival of its per-step log lines.
   Goal: within 5%. The local server runs in this process, on the same CPUs as training: its share of the work
   (receiving and hashing each checkpoint) is part of the measured cost here, unlike with a remote Hub.

Every run is a child process (`python -m hubtune.cli train`) pointed at the server with HF_ENDPOINT, as a user's
would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench import data as bench_data
from bench.common import REPO, Context, alternate, benchmark, row, summarize
from bench.training import STEP_LINE

TOKEN = "bench-write"


def env_for(url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                "HF_HUB_DISABLE_XET": "1", "PYTHONUNBUFFERED": "1"})
    return env


def timed_train(args: list[str], env: dict[str, str], until_step: int | None = None,
                marks: dict[str, float] | None = None) -> dict[int, float]:
    """Run `hubtune train ARGS`; {step: seconds since the start at which its log line arrived}. With `until_step`,
    the run is killed once that step is logged. `marks`: {text: seconds} of the first line holding each text."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hubtune.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    times, tail = {}, []
    for line in proc.stderr:
        tail = (tail + [line])[-40:]
        for text in marks or {}:
            if text in line and not marks[text]:
                marks[text] = time.perf_counter() - start
        match = STEP_LINE.search(line)
        if match:
            times[int(match.group(1))] = time.perf_counter() - start
            if until_step is not None and int(match.group(1)) >= until_step:
                proc.kill()
                break
    code = proc.wait(timeout=600)
    if (until_step is None and code != 0) or (until_step is not None and until_step not in times):
        raise RuntimeError(f"hubtune train failed ({code}): {''.join(tail)[-2000:]}")
    return times


def common_flags(root: Path, out: Path, model: str, image_size: int, batch_size: int) -> list[str]:
    return ["--model", model, "--no-pretrained", "--dataset", str(root), "--image-size", str(image_size),
            "--batch-size", str(batch_size), "--num-workers", "2", "--no-progress", "--log-every",
            "1", "--report-to", "none", "--val-fraction", "0.05", "--seed", "0", "--output-dir", str(out)]


@benchmark("hub_checkpoints")
def run(ctx: Context) -> dict:
    from hubtune import checkpoint
    from hubtune.localhub import LocalHub

    n, shards, model, image_size, batch_size = ctx.pick((64, 2, "test_resnet", 32, 8), (512, 4, "resnet50", 64, 8))
    root = bench_data.dataset(n, shards)
    server = LocalHub(ctx.scratch / "hub-store", tokens={TOKEN: ("bench", "write")}).start()
    try:
        # 1. a run that leaves its checkpoints on the Hub (saved at steps 1 and 2, its first epoch cut short by
        # --max-steps), then runs that resume it and train step 3 in a second epoch
        repo = f"bench/resume-{uuid.uuid4().hex[:8]}"
        first = ctx.scratch / "first"
        timed_train(common_flags(root, first, model, image_size, batch_size)
                    + ["--epochs", "1", "--max-steps", "2", "--save-every", "1", "--push-to-hub", repo, "--hub-checkpoints"],
                    env_for(server.url, ctx.scratch / "home-first"))
        resumed = checkpoint.listing(first)[-1]
        size_mb = sum(f.stat().st_size for f in resumed.iterdir()) / 1e6
        counter = iter(range(10**6))

        downloads: list[float] = []

        def resume(where: str) -> float:
            i = next(counter)
            marks = {"--resume: downloading ": 0.0, "--resume: downloaded ": 0.0}
            out, home = ctx.scratch / f"resume-{i}", ctx.scratch / f"home-{i}"
            if where == "latest":
                shutil.copytree(first, out)  # the machine that kept its disk (copying is not timed)
            try:
                times = timed_train(common_flags(root, out, model, image_size, batch_size)
                                    + ["--epochs", "2", "--max-steps", "3", "--push-to-hub", repo, "--resume", where],
                                    env_for(server.url, home), until_step=3, marks=marks)
                if where == "hub":
                    downloads.append(marks["--resume: downloaded "] - marks["--resume: downloading "])
                return times[3]
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(home, ignore_errors=True)

        resumes = alternate(ctx.reps, {"hub": lambda: resume("hub"), "latest": lambda: resume("latest")}, ctx.log,
                            "resume")
        rate = summarize([size_mb / seconds for seconds in downloads])

        # 2. throughput with uploads running
        steps_model, steps_size, steps_batch, every, warm, measure = ctx.pick(
            ("test_resnet", 32, 8, 2, 2, 4), ("resnet18", 128, 32, 8, 3, 16))
        steps_root = bench_data.dataset(*ctx.pick((64, 2), (1280, 4)))  # the window fits in the first epoch

        def rate_with(uploads: bool) -> float:
            i = next(counter)
            out, home = ctx.scratch / f"steps-{i}", ctx.scratch / f"home-steps-{i}"
            extra_flags = ["--push-to-hub", f"bench/steps-{uuid.uuid4().hex[:8]}", "--hub-checkpoints"] \
                if uploads else []
            try:
                times = timed_train(common_flags(steps_root, out, steps_model, steps_size, steps_batch)
                                    + ["--epochs", "1", "--max-steps", str(warm + measure + 1), "--save-every", str(every),
                                       *extra_flags], env_for(server.url, home), until_step=warm + measure)
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(home, ignore_errors=True)
            return measure * steps_batch / (times[warm + measure] - times[warm])

        rates = alternate(ctx.reps, {"on": lambda: rate_with(True), "off": lambda: rate_with(False)}, ctx.log,
                          "uploads")
    finally:
        server.stop()
    rows = [
        row(f"time from start to the first trained step, {model} checkpoint of {size_mb:.0f} MB", "s",
            resumes["hub"], resumes["latest"], comparison_name="--resume latest (local disk)",
            note="--resume hub: empty output dir and HF cache; the extra time is the download and its verification",
            higher_is_better=False),
        row(f"--resume hub download rate through the local server (loopback), {model}", "MB/s", rate,
            note="checkpoint size / time between the log lines `downloading` and `downloaded` (verified)"),
        row(f"training step rate while checkpoints upload (--hub-checkpoints, a save every {every} steps), "
            f"{steps_model} fp32", "img/s", rates["on"], rates["off"], comparison_name="without --hub-checkpoints",
            goal=(">=", 0.95), note="ratio = rate with uploads / without: within 5% is the goal; the server shares "
            "the CPUs here"),
    ]
    return {"rows": rows,
            "params": {"resume_model": model, "checkpoint_mb": round(size_mb, 1), "image_size": image_size,
                       "batch_size": batch_size, "steps_model": steps_model, "steps_image_size": steps_size,
                       "steps_batch_size": steps_batch, "save_every": every, "warm_steps": warm,
                       "measured_steps": measure, "reps": ctx.reps},
            "details": {"resume": resumes, "download_mb_s": rate, "throughput": rates}}
