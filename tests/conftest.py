"""Shared fixtures: an isolated HF cache, a local Hub on loopback, tiny generated image datasets.

The Hugging Face clients read HF_ENDPOINT when they are imported, so this module reserves a loopback
port and points the environment at it before anything imports huggingface_hub, datasets or timm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import examples, free_port, make_image_dataset  # noqa: E402 (imports no Hugging Face client)

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="hubtune-tests-"))
HUB_PORT = free_port()
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
os.environ.update(
    {
        "HF_ENDPOINT": HUB_URL,
        "HF_HOME": str(_SESSION_HOME / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.pop(_var, None)
# A tool that runs pytest in a process that already imported the clients (mutmut) gets them as they were; only the
# tests that talk to the local Hub need HF_ENDPOINT read at import, and the `hub` fixture checks that.

import datasets  # noqa: E402
import pytest  # noqa: E402

# datasets waits 5 s after every parquet stream for pyarrow's reader threads (apache/arrow#45214); the tests
# read tiny files many times, for which half a second is plenty
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.5


HUB_TOKENS = {
    "tok-alice-write": ("alice", "write"),
    "tok-alice-read": ("alice", "read"),
    "tok-bob-write": ("bob", "write"),
}


@pytest.fixture(scope="session")
def hub():
    """A local Hub-compatible server on the reserved port, shared by the session."""
    import huggingface_hub

    from hubtune.localhub import LocalHub

    assert huggingface_hub.constants.ENDPOINT == HUB_URL, "huggingface_hub was imported before conftest set HF_ENDPOINT"
    server = LocalHub(_SESSION_HOME / "hub", port=HUB_PORT, tokens=HUB_TOKENS).start()
    yield server
    server.stop()


@pytest.fixture
def hub_token() -> str:
    return "tok-alice-write"


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own HF cache so negative lookups and refs never leak between tests.

    The clients read the cache locations at import, so the module constants are patched too; subprocesses
    started by a test inherit the environment variables.
    """
    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if "huggingface_hub" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_CACHE", str(cache / "hub"))
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", cache / "datasets")


@pytest.fixture(scope="session")
def two_class_parquet(tmp_path_factory) -> Path:
    """A learnable two-class parquet dataset (train split only) with a few broken images mixed in."""
    root = tmp_path_factory.mktemp("parquet_ds")
    return make_image_dataset(root, layout="parquet", per_class=60, bad=True)


@pytest.fixture(scope="session")
def two_row_groups(tmp_path_factory) -> Path:
    """A parquet file of two row groups (two shards): two workers, each with fewer shards than the stream."""
    items = examples(per_class=60, odd=False)
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": n} for n, b, _ in items],
                                     "labels": [label for *_, label in items]}, features=features)
    path = tmp_path_factory.mktemp("row_groups") / "train.parquet"
    ds.to_parquet(str(path), batch_size=60)
    return path


@pytest.fixture(scope="session")
def two_class_folder(tmp_path_factory) -> Path:
    """The same kind of data as an imagefolder tree (class subfolders)."""
    root = tmp_path_factory.mktemp("folder_ds")
    return make_image_dataset(root, layout="imagefolder", per_class=60, bad=True)


@pytest.fixture(scope="session")
def backbone(tmp_path_factory) -> Path:
    """A 'pretrained' test_resnet saved in timm's Hub format (5-class head, to be replaced)."""
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=5)
    with torch.no_grad():  # non-trivial BN statistics, so a frozen BN that drifted would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    path = tmp_path_factory.mktemp("backbone")
    timm.models.save_for_hf(net, str(path), safe_serialization=True)
    return path


@pytest.fixture
def small_disk(tmp_path, request):
    """A real tmpfs (4 MiB, or the size given as the test's parameter), unmounted afterwards (mounting needs root,
    as on the CI machine)."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = getattr(request, "param", "4m")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
