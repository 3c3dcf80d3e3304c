"""Child process of the memory benchmark: run one input pipeline over a dataset, print its peak RSS as JSON.

`python -m bench.rss_child --data DIR --pipeline hubtune|example --workers N --image-size PX`
Run in a fresh process so the peak (getrusage ru_maxrss) belongs to this pipeline alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def rss_mb() -> float:
    """Current resident set size (MiB) from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--pipeline", choices=["hubtune", "example"], required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from bench import pipeline

    root = Path(args.data)
    cfg, train_tf, _ = pipeline.timm_transforms(args.image_size)
    if args.pipeline == "hubtune":
        loader = pipeline.hubtune_loader(root, train_tf, True, args.batch_size, args.workers)
    else:
        ex_train, _ = pipeline.example_transforms(cfg)
        ds = pipeline.map_style(sorted(str(p) for p in root.glob("*.parquet")))
        loader = pipeline.example_loader(ds, ex_train, True, args.batch_size, args.workers)
    before = rss_mb()
    start = time.perf_counter()
    n = sum(len(batch["labels"]) for batch in loader)
    seconds = time.perf_counter() - start
    del loader
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": n, "rss_before_iterating_mb": round(before, 1), "peak_rss_mb": round(self_peak, 1),
                      "peak_rss_worker_mb": round(children_peak, 1) if args.workers else None,
                      "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
