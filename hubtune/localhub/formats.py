"""The Hub's JSON shapes and content rules: tree entries, listings, upload modes and model-card metadata."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from hubtune.localhub.errors import EntryNotFound
from hubtune.localhub.objects import lfs_pointer
from hubtune.localhub.store import INITIAL_GITATTRIBUTES, HubStore

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = tuple(line.split()[0][1:] for line in INITIAL_GITATTRIBUTES.splitlines())
CARD_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """``lfs`` for large, binary or LFS-typed files (parquet, weights, images), else ``regular``."""
    if size == 0:
        return "regular"
    if size >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample:
        return "lfs"
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(sample) - 3 or size <= len(sample):  # a cut multibyte character at the end is fine
            return "lfs"
    return "regular"


def card_data(store: HubStore, tree: dict[str, Any]) -> dict[str, Any] | None:
    """The parsed YAML front matter of README.md in ``tree``, or None when absent or invalid."""
    entry = tree.get("README.md")
    if entry is None:
        return None
    match = CARD_RE.search(store.object_path(entry["sha256"]).read_text("utf-8", errors="replace"))
    try:
        data = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def tree_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file entry in the Hub's tree format (``size`` is always the real content size)."""
    out = {"type": "file", "path": path, "oid": entry["oid"], "size": entry["size"]}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return out


def list_tree(tree: dict[str, Any], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries below folder ``prefix`` ("" = root): directories first, then files, each sorted by path."""
    dir_hashes: dict[str, Any] = {}
    for path in sorted(tree):
        parts = path.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            dir_hashes.setdefault(folder, hashlib.sha1()).update(f"{path}\0{tree[path]['oid']}\n".encode())
    if prefix and prefix not in dir_hashes:
        what = "is a file, not a folder" if prefix in tree else "does not exist"
        raise EntryNotFound(f"path {prefix!r} {what} at this revision")
    base = prefix + "/" if prefix else ""

    def wanted(path: str) -> bool:
        return path.startswith(base) and (recursive or "/" not in path[len(base):])

    dirs = [{"type": "directory", "path": d, "oid": h.hexdigest(), "size": 0} for d, h in sorted(dir_hashes.items())
            if wanted(d)]
    return dirs + [tree_entry(p, e) for p, e in sorted(tree.items()) if wanted(p)]
