"""Child process of the memory benchmark: run one input pipeline over a dataset, print its peak RSS as JSON.

`python -m bench.rss_child --data DIR --pipeline hubtune|example --workers N --image-size PX`
Run in a fresh process so the peak belongs to this pipeline alone. The peak is the kernel's high-water mark of
this process's memory (VmHWM, reset by exec). getrusage's ru_maxrss is reported too, but on Linux it keeps the
parent's RSS at fork time across the exec, so a child of the big benchmark process reports the parent's size.
Loader workers (forked, no exec) report their own VmHWM when they exit; it includes the pages they share with
this process at fork, which is the same for every dataset size. hubtune's batches (uint8) go through
hubtune.model.Normalize in this process, as train() does on a CPU; the example's come normalized from its Compose.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def status_mb(field: str, pid: str = "self") -> float:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _report_worker_peak(folder: str) -> None:
    Path(folder, f"{os.getpid()}.json").write_text(json.dumps({"peak_rss_mb": status_mb("VmHWM")}))


def record_worker_peaks(loader: object, folder: str) -> None:
    """Make every loader worker write its VmHWM to `folder` when it exits (after hubtune's own worker init)."""
    original = loader.worker_init_fn

    def init(worker_id: int) -> None:
        if original is not None:
            original(worker_id)
        from multiprocessing.util import Finalize

        Finalize(None, _report_worker_peak, args=(folder,), exitpriority=0)  # run by multiprocessing at exit

    loader.worker_init_fn = init


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
    prepare = None
    if args.pipeline == "hubtune":
        loader = pipeline.hubtune_loader(root, train_tf, True, args.batch_size, args.workers)
        prepare = pipeline.hubtune_prepare(cfg)
    else:
        ex_train, _ = pipeline.example_transforms(cfg)
        ds = pipeline.map_style(sorted(str(p) for p in root.glob("*.parquet")))
        loader = pipeline.example_loader(ds, ex_train, True, args.batch_size, args.workers)
    peaks = tempfile.mkdtemp(prefix="hubtune-rss-")
    if args.workers:
        record_worker_peaks(loader, peaks)
    before = status_mb("VmRSS")
    start = time.perf_counter()
    n = 0
    for batch in loader:  # a full pass: the workers exit at its end
        if prepare is not None:  # (hubtune's loader: stream.Batch records; the example's: dicts)
            prepare(batch.pixel_values)
        n += len(batch["labels"] if isinstance(batch, dict) else batch.labels)
    seconds = time.perf_counter() - start
    workers = [json.loads(p.read_text())["peak_rss_mb"] for p in Path(peaks).glob("*.json")]
    shutil.rmtree(peaks, ignore_errors=True)
    print(json.dumps({"images": n, "rss_before_iterating_mb": round(before, 1),
                      "peak_rss_mb": round(status_mb("VmHWM"), 1),
                      "peak_rss_worker_mb": round(max(workers), 1) if workers else None,
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
