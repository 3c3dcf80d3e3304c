"""The benchmark suite runs: `python bench/run.py --quick` exits 0 and writes one valid JSON file per benchmark.

Timings are never asserted here (they depend on the machine); bench/results/README.md has the real figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = {"pipeline", "training", "recipes", "overheads", "hub_checkpoints", "linear_probe", "resume", "memory",
              "startup"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_writes_every_result(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--results-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert {p.stem for p in out.glob("*.json")} == BENCHMARKS
    for path in out.glob("*.json"):
        result = json.loads(path.read_text())
        assert result["name"] == path.stem and result["quick"] is True
        assert {"cpu", "cores", "versions", "date"} <= set(result["machine"])
        assert result["rows"], f"{path.name} has no rows"
        for row in result["rows"]:
            assert {"benchmark", "unit", "hubtune", "comparison", "ratio", "goal", "status"} <= set(row)
            for side in ("hubtune", "comparison"):
                if row[side] is not None:
                    assert row[side]["median"] >= 0 and row[side]["n"] >= 1
    readme = (out / "README.md").read_text()
    assert "| benchmark | hubtune | comparison | ratio | goal | met? |" in readme
