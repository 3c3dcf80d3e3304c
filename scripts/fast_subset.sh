# Sourced by check_oldest.sh and check_newest.sh (which set $check): a throwaway virtualenv ($venv, $py, removed
# on exit), the fast test subset, and the versions to print. Paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

# Config, core helpers (retries over httpx2), timm models, the hub client against hubtune.localhub, one training
# run with checkpoints and resume, one trained from a streamed Hub dataset and pushed, and the exports loaded
# back in timm, hubtune and transformers: 72 tests, about 100 s on 2 cores.
FAST_TESTS=(
  tests/test_config.py
  tests/test_core.py
  tests/test_model.py
  tests/test_classifier.py
  tests/test_checkpoint.py::test_export_is_best_not_last_and_early_stopping_counter_survives_resume
  tests/test_hub.py::test_acceptance_train_from_hub_push_and_load_in_a_clean_process
  tests/test_hub.py::test_push_is_verified_idempotent_and_never_ships_checkpoints
  tests/test_hub.py::test_every_usage_snippet_of_the_card_runs_against_the_hub
  tests/test_evaluation.py::test_exports_load_in_transformers_exactly_as_in_timm
)
SHOWN=(torch torchvision timm huggingface_hub httpx2 datasets accelerate safetensors torchdata transformers
       numpy pillow pyarrow fsspec tqdm pyyaml jinja2 matplotlib)

venv=$(mktemp -d "${TMPDIR:-/tmp}/hubtune-venv.XXXXXX")
status="FAILED before the tests (venv or install)"
finish() {  # on any exit: remove the virtualenv (about 5 GB), then one closing line
  rm -rf "$venv"
  echo "$check: $status; $((SECONDS - start)) s in all (virtualenv, installs, tests, cleanup)"
}
trap finish EXIT
"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

show_versions() {  # one line, name==version, for the packages this check is about
  "$py" - "${SHOWN[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

def have(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"

print("resolved: " + " ".join(f"{n}=={have(n)}" for n in sys.argv[1:]))
PY
}

run_fast_tests() {
  local rc=0
  "$py" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "${FAST_TESTS[@]}" || rc=$?
  status=$([ $rc -eq 0 ] && echo passed || echo "FAILED (pytest exit $rc)")
  return $rc
}
