"""`hubtune demo`: the whole workflow in a few minutes on a laptop CPU, against a local Hub, with narration.

It starts the local Hub server, publishes a tiny pre-trained backbone and a synthetic "cats vs dogs" dataset to
it, fine-tunes through the real entry point (`accelerate launch -q hubtune/train.py`), interrupts that run with
SIGTERM and resumes it, pushes the result, loads it back in a clean process with hubtune, plain timm and
transformers, and ends with the commands and code to do that again. Every step that uses the Hugging Face clients
runs in a child process whose environment points at the local Hub (the clients read HF_ENDPOINT when they are
imported) and has its own HF_HOME.

Modules: `run` (the demo from start to end), `steps` (publish, train and interrupt, resume and push, load),
`children` (the child processes), `child` (what runs in them: `python -m hubtune.demo.child`, imported by nothing
here so that `-m` runs it once), `snippets` (the printed commands and load code), `data` (the synthetic images and
the backbone's pre-training), `narration`.
"""

from hubtune.demo.run import add_demo_arguments, main, run_demo
from hubtune.demo.steps import (
           DATASET_REPO,
           MARKER,
           MIN_ACCURACY,
           MODEL_REPO,
           SUMMARY_FILE,
           default_workdir,
           prepare_workdir,
)
from hubtune.errors import DemoError

__all__ = ["DATASET_REPO", "MARKER", "MIN_ACCURACY", "MODEL_REPO", "SUMMARY_FILE", "DemoError", "add_demo_arguments",
           "default_workdir", "main", "prepare_workdir", "run_demo"]
