"""Kill-twice-and-resume at random instants on a saturated CPU (issue 21, point 6); not part of `bench.run`.

Each scenario starts the training command of tests/test_checkpoint.py (test_resnet at 32 px, 3 epochs, a checkpoint
every 4 steps, dropout, EMA, gradual unfreezing, one loader worker), SIGKILLs it at a random instant (before its
first checkpoint included), reruns the same command plus `--resume latest`, SIGKILLs that at a random instant too,
then runs it to the end; the result must be bitwise the uninterrupted run's (weights, EMA weights, history). While
it runs, one busy process per core spins. A requeued job runs the same command every time: every attempt here
carries `--resume latest`, the first one too.

    python -m bench.resume_under_load --runs 50 [--results bench/results/resume_under_load.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _command(dataset: Path, out: Path) -> list[str]:
    from test_checkpoint import flags

    return [sys.executable, "-m", "hubtune.cli", "train", *flags(dataset, out, "--num-workers", "1"),
            "--resume", "latest"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kill_after(cmd: list[str], seconds: float) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _same(out: Path, reference: Path) -> str | None:
    """None when the runs are bitwise equal; else what differs."""
    import torch
    from safetensors.torch import load_file

    from hubtune import checkpoint

    for name in (checkpoint.MODEL_FILE, checkpoint.EMA_TENSORS):
        ref = load_file(str(checkpoint.listing(reference)[-1] / name))
        got = load_file(str(checkpoint.listing(out)[-1] / name))
        if ref.keys() != got.keys() or any(not torch.equal(ref[k], got[k]) for k in ref):
            return f"{name} differs"
    history = [json.loads((d / "metrics.json").read_text())["history"] for d in (out, reference)]
    return None if history[0] == history[1] else "history differs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "resume_under_load.json")
    args = parser.parse_args()
    from helpers import make_image_dataset

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="hubtune-resume-load-"))
    dataset = make_image_dataset(work / "data", layout="imagefolder", per_class=60, bad=True)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for s in spinners:
        s.start()
    try:
        reference = work / "reference"
        started = time.monotonic()
        done = subprocess.run(_command(dataset, reference), cwd=REPO, env=_env(), capture_output=True, text=True)
        whole = time.monotonic() - started
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        print(f"uninterrupted run under load: {whole:.1f}s", flush=True)
        scenarios = []
        for i in range(args.runs):
            out = work / f"run-{i}"
            kills = [rng.uniform(0.5, whole), rng.uniform(0.5, whole)]
            codes = [_kill_after(_command(dataset, out), t)[0] for t in kills]
            final = subprocess.run(_command(dataset, out), cwd=REPO, env=_env(), capture_output=True, text=True)
            problem = (f"exit {final.returncode}: {final.stderr.strip().splitlines()[-1] if final.stderr else ''}"
                       if final.returncode != 0 else _same(out, reference))
            scenarios.append({"kills_at_s": [round(t, 2) for t in kills], "killed_exit_codes": codes,
                              "ok": problem is None, "problem": problem})
            print(f"{i + 1}/{args.runs}: kills at {kills[0]:.1f}s, {kills[1]:.1f}s (exit {codes}): "
                  f"{'bitwise equal' if problem is None else problem}", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join(5)
    ok = sum(s["ok"] for s in scenarios)
    summary = {"runs": len(scenarios), "bitwise_equal": ok, "uninterrupted_s_under_load": round(whole, 1),
               "cores_spinning": len(spinners), "seed": args.seed, "scenarios": scenarios}
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{ok}/{len(scenarios)} resumed bitwise equal; written {args.results}")
    return 0 if ok == len(scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
