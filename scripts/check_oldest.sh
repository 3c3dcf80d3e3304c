#!/usr/bin/env bash
# The fast test subset on the oldest versions pyproject.toml allows: every `NAME>=X` of [project] dependencies
# (torch and torchvision included) and transformers of the dev extra installed as NAME==X, in a throwaway
# virtualenv; everything else as pip resolves it. A lower bound that fails here is not true: raise it.
# torch and torchvision are pinned as NAME===X.Y.Z, the plain PyPI builds (torchvision's wheel is linked against
# torch's CUDA build; a local variant such as 2.13.0+cpu in a find-links folder would not load it): a download of
# about 2 GB. Run by .ci/run after the main suite.
check="oldest allowed versions"
. "$(dirname "$0")/fast_subset.sh"

"$py" - > "$venv/oldest.txt" <<'PY'
import sys
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
dev = [r for r in project["optional-dependencies"]["dev"] if Requirement(r).name == "transformers"]
for line in project["dependencies"] + dev:
    req = Requirement(line)
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if len(lower) != 1:
        sys.exit(f"check_oldest: {line!r} has no single lower bound (NAME>=X) to test")
    if req.name in ("torch", "torchvision"):
        print(f"{req.name}==={'.'.join(map(str, (Version(lower[0]).release + (0, 0))[:3]))}")
    else:
        print(f"{req.name}=={lower[0]}")
PY
echo "pins: $(tr '\n' ' ' < "$venv/oldest.txt")"
"$py" -m pip install --quiet -c "$venv/oldest.txt" torch torchvision
if ! "$py" -m pip install --quiet -c "$venv/oldest.txt" -e ".[dev]"; then  # quiet hides why: show it
  "$py" -m pip install --dry-run -c "$venv/oldest.txt" -e ".[dev]" 2>&1 | grep -A12 "conflict is caused by" || true
  exit 1
fi
show_versions
run_fast_tests
