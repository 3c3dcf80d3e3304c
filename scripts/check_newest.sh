#!/usr/bin/env bash
# The fast test subset on the newest releases pip allows (no constraints.txt): accelerate, datasets,
# huggingface_hub, timm, transformers, safetensors, torchdata... as a user installing today gets them, with
# README's torch==2.14.1 torchvision==0.29.1, in a throwaway virtualenv. Run before every submission.
check="newest releases"
. "$(dirname "$0")/fast_subset.sh"

"$py" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$py" -m pip install --quiet --upgrade -e ".[dev]"
show_versions
run_fast_tests
