"""What `hubtune demo` ends with: how to serve its Hub again and load the model, as text to copy and paste.

The load snippets are the code the demo itself runs in its clean-process load step (`python -m
hubtune.demo.child load` executes this very text), so what it prints at the end is what it has just run.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from hubtune.localhub.serve import DEFAULT_PORT

# each snippet leaves `predictions`: the top-1 {"label", "score"} of every image, in the order of `images`
_HUBTUNE = """\
import glob

from hubtune import ImageClassifier

images = sorted(glob.glob({pattern}))
classifier = ImageClassifier.from_pretrained({repo_id})
predictions = [top[0] for top in classifier.predict(images, top_k=1)]
print(predictions)
"""

_TIMM = """\
import glob

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

images = sorted(glob.glob({pattern}))
model = timm.create_model({hf_hub_id}, pretrained=True).eval()
transform = create_transform(**resolve_data_config(model=model))
labels = model.pretrained_cfg["label_names"]
with torch.inference_mode():
    probs = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in images])).softmax(-1)
predictions = [{{"label": labels[i], "score": p[i].item()}} for p, i in zip(probs, probs.argmax(-1).tolist())]
print(predictions)
"""

_TRANSFORMERS = """\
import glob

from transformers import pipeline

images = sorted(glob.glob({pattern}))
classifier = pipeline("image-classification", model={repo_id})
predictions = [top[0] for top in classifier(images, top_k=1)]
print(predictions)
"""


def load_snippets(repo_id: str, images: Path) -> dict[str, str]:
    """Python that loads `repo_id` with hubtune, timm and transformers and classifies the JPEGs in `images`."""
    values = {"repo_id": json.dumps(repo_id), "hf_hub_id": json.dumps(f"hf-hub:{repo_id}"),
              "pattern": json.dumps(str(images / "*.jpg"))}
    return {name: text.format(**values) for name, text in
            (("hubtune", _HUBTUNE), ("timm", _TIMM), ("transformers", _TRANSFORMERS))}


def serve_command(hub_root: Path, user: str, port: int = DEFAULT_PORT) -> str:
    """`hubtune hub serve` over the demo's storage; it prints a write token for `user` when it starts."""
    return shlex.join(["hubtune", "hub", "serve", "--root", str(hub_root), "--user", user, "--port", str(port)])


def client_exports(port: int = DEFAULT_PORT) -> str:
    """The variables that point the Hugging Face clients at `serve_command`'s server (read when they are imported)."""
    return f"export HF_ENDPOINT=http://127.0.0.1:{port} HF_HUB_DISABLE_XET=1"
