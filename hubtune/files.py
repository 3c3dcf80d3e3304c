"""What hubtune keeps on disk: the file names every module agrees on, atomic writes and file digests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hubtune.errors import CheckpointError, DiskFullError

# a run's output directory (the Hub-ready export) and its checkpoints
TRAIN_CONFIG_FILE = "train_config.yaml"
MODEL_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINTS_BRANCH = "checkpoints"  # the Hub branch --hub-checkpoints uploads to (and `hubtune checkpoints` reads) by default
PLOTS_DIR = "plots"  # here, not in plots.py: listing a run's files must not import matplotlib
# a checkpoint folder in CHECKPOINTS_DIR: its name (step_name), the pattern that reads it back, a glob for listings
STEP_PREFIX = "step-"
_STEP_DIGITS = r"\d{6,}"
STEP_PATTERN = rf"{STEP_PREFIX}{_STEP_DIGITS}"  # for larger patterns that hold one (hf://REPO/checkpoints/step-N)
STEP_NAME = re.compile(rf"^{STEP_PREFIX}({_STEP_DIGITS})$")  # group 1: the step
STEP_GLOB = f"{STEP_PREFIX}*"  # also matches names that are not checkpoints': filter with step_of
TMP_PREFIX = ".tmp-"  # a file or folder being written, renamed into place when complete; never pushed


def step_name(step: int) -> str:
    """The folder name of the checkpoint saved at optimizer step `step` (step-NNNNNN)."""
    return f"{STEP_PREFIX}{step:06d}"


def step_of(name: str) -> int | None:
    """The optimizer step of a checkpoint folder name (step-NNNNNN); None for any other name."""
    match = STEP_NAME.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def checkpoint_step(name: str) -> int:
    """The optimizer step of a name already known to be a checkpoint folder's (listed by `newest_first`, or matched
    by a step-NNNNNN pattern).

    Raises:
        CheckpointError: `name` is not a checkpoint folder name.
    """
    step = step_of(name)
    if step is None:
        raise CheckpointError(f"{name!r} is not a checkpoint folder name (step-NNNNNN)")
    return step


def newest_first(names: Iterable[str]) -> list[str]:
    """The checkpoint folder names among `names`, highest step first."""
    steps = [(step, n) for n in names if (step := step_of(n)) is not None]
    return [n for _, n in sorted(steps, key=lambda pair: pair[0], reverse=True)]


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None], fsync: bool = True) -> Path:
    """Write `path` so that readers see either the old file or the complete new one, never a part.

    `data` is the content, or a function that writes a given temporary path (safetensors' save_file, for one).
    The temporary file sits next to `path` (one filesystem, so the rename is atomic) and is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (where a folder to be created would go)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable(path: Path, directory: bool) -> str | None:
    """Why `path`, a directory to create or fill (`directory`) or a file to create or replace, cannot be written;
    None when it can be, as far as can be told without writing (a later write can still fail: a full disk)."""
    if directory and path.exists() and not path.is_dir():
        return f"{path} is a file"
    if not directory and path.is_dir():
        return f"{path} is a directory"
    nearest = nearest_existing(path if directory else path.parent)
    if not nearest.is_dir():
        return f"{nearest} is a file"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"{nearest} is not writable"
    return None


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def disk_space(folder: Path, needed: int, what: str, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a write that ran out of space into a DiskFullError naming the folder and the space needed.

    Checked before (so nothing partial is written when the space is known to be short) and after a failed write
    (safetensors reports a full disk as its own error type, not as OSError). `cleanup` (a partial file or folder)
    is removed on any failure.
    """
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(_no_space(what, folder, free, needed))
    try:
        yield
    except Exception as err:
        left = shutil.disk_usage(folder).free  # before the cleanup frees the partial write's space again
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or left < needed:
            raise DiskFullError(_no_space(what, folder, shutil.disk_usage(folder).free, needed)) from err
        raise


def _no_space(what: str, folder: Path, free: int, needed: int) -> str:
    return (f"{what}: not enough space in {folder} ({free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB "
            "needed); free some space or use an --output-dir on another disk (what was saved before is intact)")
