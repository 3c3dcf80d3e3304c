"""Run hubtune's benchmarks: `python bench/run.py [--quick] [--only NAME[,NAME]] [--results-dir DIR]`.

Every benchmark writes <results-dir>/<name>.json (its rows, parameters, details and the machine) and the run
rewrites <results-dir>/README.md, the Markdown table of every JSON file there. The full run writes to
bench/results/ (committed); --quick uses tiny sizes and one repetition and writes to bench/results/quick/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# offline and out of the user's caches: everything the benchmarks read is generated under bench/.cache
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / "bench" / ".cache" / "hf_datasets"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

from bench.common import BENCHMARKS, FOREIGN, QUIET, Context, machine_info  # noqa: E402
from bench.report import write_readme  # noqa: E402

ORDER = ["pipeline", "training", "recipes", "overheads", "hub_checkpoints", "linear_probe", "resume", "memory", "startup"]
for _module in ORDER:
    importlib.import_module(f"bench.{_module}")  # each module registers its benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (checks that it all runs)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these benchmarks (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where to write the JSON files and README.md (default: bench/results, "
                             "bench/results/quick with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default: 1 quick, 3 full)")
    parser.add_argument("--no-wait-quiet", dest="wait_quiet", action="store_false",
                        help="full runs wait (up to 60 s) before each timed run until other jobs leave the CPUs; "
                             "this turns that off")
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or sorted(
        BENCHMARKS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    out = args.results_dir or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (1 if args.quick else 3)
    QUIET["enabled"] = args.wait_quiet and not args.quick
    failed = []
    total = time.perf_counter()
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        machine = machine_info()
        QUIET.update(waited_s=0.0, busy_at_start=[])
        FOREIGN["log"] = []
        with tempfile.TemporaryDirectory(prefix=f"hubtune-bench-{name}-") as scratch:
            ctx = Context(quick=args.quick, scratch=Path(scratch), reps=reps,
                          log=lambda msg: print(msg, flush=True))
            try:
                result = BENCHMARKS[name](ctx)
            except Exception:  # one broken benchmark must not hide the others' results
                traceback.print_exc()
                failed.append(name)
                continue
            finally:
                # loader iterators left in reference cycles keep their workers alive; hubtune's workers ignore
                # SIGTERM, so without this the interpreter would hang at exit joining them
                gc.collect()
        result = {"name": name, "quick": args.quick, "machine": machine,
                  "wall_s": round(time.perf_counter() - start, 1),
                  "load_after": [round(x, 2) for x in os.getloadavg()],
                  "other_jobs": {"busy_fraction_before_each_timed_run": QUIET["busy_at_start"],
                                 "waited_for_quiet_s": round(QUIET["waited_s"], 1),
                                 "discard_limit": FOREIGN["limit"], "runs": FOREIGN["log"]},
                  **result}
        tmp = out / f"{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out / f"{name}.json")
        for r in result["rows"]:
            print(f"  {r['benchmark']}: ratio {r['ratio'] if r['ratio'] is None else round(r['ratio'], 3)} "
                  f"goal {r['goal']} -> {r['status']}", flush=True)
        print(f"   {name} took {result['wall_s']} s", flush=True)
    import multiprocessing

    for child in multiprocessing.active_children():  # loader workers a benchmark left behind (they ignore SIGTERM)
        print(f"warning: killing leftover worker process {child.pid} ({child.name})", file=sys.stderr)
        child.kill()
        child.join()
    readme = write_readme(out, args.quick)
    print(f"wrote {readme} ({time.perf_counter() - total:.0f} s)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
