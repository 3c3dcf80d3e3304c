"""Shared benchmark machinery: the registry, alternating repetitions, summaries, machine info, result rows.

A benchmark is a function `fn(ctx: Context) -> dict` registered with `@benchmark("name")`. It returns
{"rows": [...], "params": {...}, "details": {...}}; each row compares hubtune with its comparison on one figure
and is built with `row(...)`. run.py adds the machine info and writes `<results-dir>/<name>.json`.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS: dict[str, Callable[["Context"], dict]] = {}


def benchmark(name: str) -> Callable:
    """Register a benchmark function under `name` (the JSON file and `--only` name)."""

    def register(fn: Callable[["Context"], dict]) -> Callable[["Context"], dict]:
        BENCHMARKS[name] = fn
        return fn

    return register


@dataclass
class Context:
    """What a benchmark may depend on: the size preset and a scratch directory."""

    quick: bool
    scratch: Path
    reps: int
    log: Callable[[str], None] = field(default=print)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, min, max and relative spread ((max - min) / median) of the repetitions."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread": (max(values) - min(values)) / med
            if med else 0.0, "n": len(values), "values": values}


# budget_s bounds all waiting and re-running of one `run.py` invocation (spent_s), so a busy machine cannot make
# the suite run for hours; waited_s and busy_at_start are per benchmark
QUIET = {"enabled": False, "max_wait_s": 60.0, "threshold": 0.2, "budget_s": 360.0, "spent_s": 0.0, "waited_s": 0.0,
         "busy_at_start": []}


def _cpu_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def foreign_busy(sample_s: float = 0.3) -> float:
    """Fraction of all CPUs busy over `sample_s` while this process tree sits idle: other people's jobs."""
    try:
        busy0, total0 = _cpu_jiffies()
        time.sleep(sample_s)
        busy1, total1 = _cpu_jiffies()
    except (OSError, IndexError, ValueError):
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_quiet(log: Callable[[str], None] = print) -> None:
    """Before a timed run (full runs only): wait, up to QUIET["max_wait_s"], until other jobs leave the CPUs.

    On a shared machine another process using one core makes a 2-thread torch run stall at every parallel region,
    so a run that starts while someone else computes measures them, not us. The busy fraction at each start is
    recorded in the results.
    """
    if not QUIET["enabled"]:
        return
    start = time.perf_counter()
    busy = foreign_busy()
    limit = min(QUIET["max_wait_s"], QUIET["budget_s"] - QUIET["spent_s"])
    while busy > QUIET["threshold"] and time.perf_counter() - start < limit:
        time.sleep(2.0)
        busy = foreign_busy()
    waited = time.perf_counter() - start
    QUIET["waited_s"] += waited
    QUIET["spent_s"] += waited
    QUIET["busy_at_start"].append(round(busy, 2))
    if waited > 1.0:
        log(f"    waited {waited:.0f} s for other jobs to leave the CPUs (busy {busy:.0%} now)")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _descendants_cpu(root: int) -> float:
    """CPU seconds of the live descendants of `root` (loader workers, child processes)."""
    parent, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    total = 0.0
    for pid in cpu:
        p = parent.get(pid)
        while p and p != root:
            p = parent.get(p)
        if p == root and pid != root:
            total += cpu[pid]
    return total


UNREAPED_CPU_S = 0.0  # CPU seconds of descendants killed without being reaped here (startup's loader workers)


def _cpu_sample() -> tuple[float, float, float]:
    """(all CPUs busy seconds, all CPUs total seconds, this process tree's CPU seconds)."""
    busy, total = _cpu_jiffies()
    t = os.times()
    mine = (t.user + t.system + t.children_user + t.children_system + _descendants_cpu(os.getpid())
            + UNREAPED_CPU_S)
    return busy / _TICK, total / _TICK, mine


def foreign_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of the machine's CPU capacity used by processes outside this tree between two samples."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    mine = after[2] - before[2]
    return max(busy - mine, 0.0) / max(total, 1e-9)


FOREIGN = {"limit": 0.15, "retries": 2, "log": []}


def alternate(reps: int, runners: dict[str, Callable[[], float]], log: Callable[[str], None] = print,
              label: str = "") -> dict[str, dict[str, Any]]:
    """Run every runner `reps` times, interleaved, reversing the order every other repetition (ABBA).

    Alternating in one process means slow drift of the machine (thermal, other jobs, caches) hits every side alike.
    In full runs (QUIET enabled) a run during which other processes used more than FOREIGN["limit"] of the CPUs
    is discarded and repeated (at most FOREIGN["retries"] times); every run's foreign share is recorded.
    """
    values: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            for attempt in range(FOREIGN["retries"] + 1):
                gc.collect()
                wait_quiet(log)
                before = _cpu_sample()
                start = time.perf_counter()
                value = runners[name]()
                share = foreign_share(before, _cpu_sample())
                FOREIGN["log"].append({"run": f"{label} {name} rep {rep + 1}", "value": value,
                                       "foreign_cpu_share": round(share, 3), "kept": True})
                if (not QUIET["enabled"] or share <= FOREIGN["limit"] or attempt == FOREIGN["retries"]
                        or QUIET["spent_s"] >= QUIET["budget_s"]):
                    break
                FOREIGN["log"][-1]["kept"] = False
                QUIET["spent_s"] += time.perf_counter() - start
                log(f"  {label} rep {rep + 1}/{reps} {name}: {value:.4g} discarded, other jobs used {share:.0%} "
                    "of the CPUs; again")
            values[name].append(value)
            log(f"  {label} rep {rep + 1}/{reps} {name}: {value:.4g}" + (f"  (other jobs {share:.0%})" if share > 0.05
                                                                           else ""))
    return {k: summarize(v) for k, v in values.items()}


GOALS = {">=": lambda r, t: r >= t, "<=": lambda r, t: r <= t, "<": lambda r, t: r < t, ">": lambda r, t: r > t}


def row(benchmark: str, unit: str, hubtune: dict | None, comparison: dict | None = None, *,
        comparison_name: str = "", ratio: float | None = None, ratio_of: str = "hubtune / comparison",
        goal: tuple[str, float] | None = None, status: str | None = None, note: str = "",
        higher_is_better: bool = True) -> dict[str, Any]:
    """One table row. `ratio` defaults to median(hubtune) / median(comparison); `goal` is (op, threshold) on it.

    `status` overrides the met/missed verdict (e.g. "not implemented").
    """
    if ratio is None and hubtune and comparison and comparison["median"]:
        ratio = hubtune["median"] / comparison["median"]
    met = None
    if status is None and goal is not None and ratio is not None:
        met = GOALS[goal[0]](ratio, goal[1])
        status = "met" if met else "missed"
    return {"benchmark": benchmark, "unit": unit, "hubtune": hubtune, "comparison": comparison,
            "comparison_name": comparison_name, "ratio": ratio, "ratio_of": ratio_of,
            "goal": f"{goal[0]} {goal[1]:g}x" if goal else None, "met": met, "status": status or "-",
            "note": note, "higher_is_better": higher_is_better}


def single(value: float) -> dict[str, Any]:
    """A figure measured once (sizes, counts): the same shape as summarize()."""
    return summarize([value])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "hubtune"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty-hubtune" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions, date and hubtune commit: the context every figure needs."""
    import accelerate
    import datasets
    import PIL
    import timm
    import torch
    import torchvision

    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "datasets": datasets.__version__, "accelerate": accelerate.__version__,
                     "pillow": PIL.__version__},
        "hubtune_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


class Timer:
    """perf_counter stopwatch: `with Timer() as t: ...; t.s`."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.start


def python() -> str:
    return sys.executable
