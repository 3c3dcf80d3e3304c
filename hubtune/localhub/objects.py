"""Content-addressed file contents, their upload staging area, and the index of which repos hold each object.

Layout under ``root``::

    objects/<aa>/<sha256>                       file contents, stored once per distinct content
    tmp/upload-*                                uploads being received (same filesystem, for os.replace)
    holders/<aa>/<sha256>/<type>~<ns>~<name>    empty marker: that repo holds the object (see ``add_holder``)

An object is *held* by a repo once its bytes were uploaded to that repo, or a commit of that repo contains it. Only
holders (and whoever can read a holder) may reference an object by its sha256 without sending the bytes: a bare
"this object exists somewhere" would let anyone commit another user's private file into their own repo.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from hubtune.localhub.errors import HubError

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
# Longer than any upload can sit idle: a request handler gives up on a silent client after 120 s (its socket
# timeout) and removes its staged file, so an older one belongs to a server that was killed.
STALE_UPLOAD_S = 10 * 60
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id of ``data`` (what the Hub calls the ``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> str:
    """The git-lfs pointer text stored in git in place of an LFS file."""
    return LFS_POINTER.format(sha256=sha256, size=size)


class ObjectStore:
    """File contents by sha256 below ``root``; safe for concurrent use from many threads and processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "tmp"
        for sub in ("objects", "tmp", "holders"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the content with this sha256 lives (whether or not it exists yet)."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise HubError(f"invalid sha256 oid {sha256!r}: expected 64 lowercase hex characters")
        return self.root / "objects" / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        """Whether this content is stored (with this size, when given)."""
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` once and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self._publish(self._stage(lambda f: f.write(data)), sha256)
        return sha256

    def put_stream(self, read: Callable[[int], bytes], size: int, sha256: str) -> None:
        """Receive ``size`` bytes from ``read`` and keep them if they hash to ``sha256``; raise HubError if not.

        The bytes are always read and hashed, even when the object is already stored: the upload is the proof
        that the uploader has the content. A failed or cut upload leaves nothing in the staging area.
        """
        hasher, received = hashlib.sha256(), 0

        def copy(f: IO[bytes]) -> None:
            nonlocal received
            while received < size:
                chunk = read(min(_CHUNK, size - received))
                if not chunk:
                    break
                hasher.update(chunk)
                f.write(chunk)
                received += len(chunk)

        self.path(sha256)
        tmp = self._stage(copy)
        if received != size or hasher.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise HubError(f"upload of {sha256} rejected: got {received} bytes hashing to {hasher.hexdigest()}, "
                           f"expected {size} bytes; retry the upload")
        if self.has(sha256, size):
            tmp.unlink()  # identical content is stored once
        else:
            self._publish(tmp, sha256)

    def _stage(self, write: Callable[[IO[bytes]], Any]) -> Path:
        fd, name = tempfile.mkstemp(dir=self.staging, prefix="upload-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a dropped connection or a killed handler thread: no partial file stays behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _publish(self, tmp: Path, sha256: str) -> None:
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)

    def clean_staging(self, sole_server: bool) -> list[Path]:
        """Remove uploads a killed server left in ``tmp/``; return what was removed.

        Args:
            sole_server: no other server process uses this root, so every staged file is stale. Otherwise only
                files idle for STALE_UPLOAD_S are: a younger one may be an upload another server is receiving.
        """
        removed = []
        cutoff = time.time() - STALE_UPLOAD_S
        for entry in os.scandir(self.staging):
            try:
                if entry.is_file(follow_symlinks=False) and (sole_server or entry.stat().st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:  # its upload just finished or failed and removed it
                continue
        return removed

    # ---- which repos hold which objects ------------------------------------------------------------------------
    def _holder_marker(self, sha256: str, repo_type: str, repo_id: str) -> Path:
        return self.root / "holders" / sha256[:2] / sha256 / f"{repo_type}~{repo_id.replace('/', '~')}"

    def add_holder(self, sha256s: Iterable[str], repo_type: str, repo_id: str) -> None:
        """Record that the repo holds these objects (uploaded to it, or in one of its commits)."""
        for sha256 in dict.fromkeys(sha256s):
            marker = self._holder_marker(sha256, repo_type, repo_id)
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()

    def holds(self, sha256: str, repo_type: str, repo_id: str) -> bool:
        """Whether the repo holds this object."""
        self.path(sha256)  # validates the oid before it becomes part of a path
        return self._holder_marker(sha256, repo_type, repo_id).exists()

    def holders(self, sha256: str) -> list[tuple[str, str]]:
        """(repo type, repo id) of every repo that holds this object."""
        self.path(sha256)
        folder = self.root / "holders" / sha256[:2] / sha256
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        return [(t, f"{ns}/{name}") for t, ns, name in (n.split("~") for n in names if n.count("~") == 2)]
