"""On-disk storage for the local Hub: repos, commits, branches and tags over content-addressed objects.

Layout under ``root`` (objects, upload staging and the holder index are described in :mod:`.objects`)::

    repos/<type>s/<ns>/<name>/repo.json            visibility, timestamps and refs (branches, tags, PRs)
    repos/<type>s/<ns>/<name>/commits/<sha>.json   immutable commits: parent, message, full file tree

Every file is written with ``hubtune.files.atomic_write`` (temporary name, fsync, ``os.replace``), and a commit
file is always written before the ref that points to it, so an interrupted upload or commit is never visible.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from hubtune.files import atomic_write
from hubtune.localhub.errors import Conflict, EntryNotFound, HubError, RepoNotFound, RevisionNotFound
from hubtune.localhub.objects import ObjectStore, git_blob_sha1, lfs_pointer
from hubtune.localhub.refnames import check_ref_name

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
INITIAL_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in ("bin", "ckpt", "gz", "h5", "npy", "npz", "onnx", "parquet", "arrow", "pt", "pth", "safetensors",
                "tar", "zip", "png", "jpg", "jpeg", "webp")
)
_HEX40 = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{4,39}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HOLDERS_INDEXED = ".complete"


@dataclass(frozen=True)
class Op:
    """One commit operation: add a stored object at ``path``, delete a file, or delete a folder."""

    kind: Literal["add", "delete_file", "delete_folder"]
    path: str
    sha256: str | None = None
    lfs: bool = False


def iso_now() -> str:
    """Current UTC time as ISO-8601 with milliseconds and ``Z``, like the Hub."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def check_repo_path(path: str) -> str:
    """Return ``path`` if it is a valid file path inside a repo, else raise HubError."""
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git" or "\0" in path:
        raise HubError(f"invalid path in repo {path!r}: use a relative path without empty, '.', '..' or .git parts")
    return path


class HubStore:
    """Repos, commits and objects on disk below ``root``; safe for concurrent use from many threads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.objects = ObjectStore(self.root)
        self._locks: dict[Path, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._index_holders()

    # ---- objects -------------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        """Where the content with this sha256 lives (whether or not it exists yet)."""
        return self.objects.path(sha256)

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        """Whether this content is stored anywhere (with this size, when given); says nothing about access."""
        return self.objects.has(sha256, size)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` once and return its sha256."""
        return self.objects.put_bytes(data)

    def put_stream(self, read: Callable[[int], bytes], size: int, sha256: str) -> None:
        """Store ``size`` bytes from ``read`` after checking they hash to ``sha256``; raise HubError if not."""
        self.objects.put_stream(read, size, sha256)

    def holds(self, repo_type: str, repo_id: str, sha256: str) -> bool:
        """Whether the repo holds this object: it was uploaded to the repo, or one of its commits contains it."""
        return self.objects.holds(sha256, repo_type, repo_id)

    def holders(self, sha256: str) -> list[tuple[str, str]]:
        """(type, id) of the repos that hold this object."""
        return self.objects.holders(sha256)

    def add_holder(self, repo_type: str, repo_id: str, sha256s: Iterable[str]) -> None:
        """Record that the repo holds these objects."""
        self.objects.add_holder(sha256s, repo_type, repo_id)

    def _index_holders(self) -> None:
        # Roots written before the holder index existed: index every commit once, so their repos keep the
        # objects they already have. Idempotent, so two servers starting together may both run it.
        done = self.root / "holders" / _HOLDERS_INDEXED
        if done.exists():
            return
        for commits in (self.root / "repos").glob("*/*/*/commits"):
            type_dir, ns, name = commits.parts[-4:-1]
            for path in commits.glob("*.json"):
                tree = json.loads(path.read_bytes())["tree"]
                self.add_holder(type_dir[:-1], f"{ns}/{name}", (e["sha256"] for e in tree.values()))
        done.touch()

    # ---- repos ---------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        """Directory of a repo; raises HubError for a malformed type or id."""
        if repo_type not in REPO_TYPES:
            raise HubError(f"repo type must be one of {list(REPO_TYPES)}, got {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.fullmatch(p) and ".." not in p for p in parts) or parts[1].endswith(
            ".git"
        ):
            raise HubError(f"invalid repo id {repo_id!r}: expected 'namespace/name' with letters, digits, '-_.'")
        return self.root / "repos" / f"{repo_type}s" / parts[0] / parts[1]

    @contextmanager
    def _repo_lock(self, repo_dir: Path) -> Iterator[None]:
        # The thread lock serialises writers in this process; flock also guards against a second server process.
        with self._locks_guard:
            lock = self._locks.setdefault(repo_dir, threading.Lock())
        with lock:
            repo_dir.mkdir(parents=True, exist_ok=True)
            with open(repo_dir / ".lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                yield

    def load_repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo's state (``private``, ``branches``, ``tags``, ``prs``...); raises RepoNotFound."""
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RepoNotFound(f"{repo_type} repo {repo_id!r} not found; create it first with create_repo") from None

    def _save_repo(self, repo_type: str, repo_id: str, state: dict[str, Any]) -> None:
        atomic_write(self.repo_dir(repo_type, repo_id) / "repo.json", json.dumps(state, indent=1).encode())

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> bool:
        """Create a repo with an initial commit holding ``.gitattributes``; return False if it already exists."""
        repo_dir = self.repo_dir(repo_type, repo_id)
        with self._repo_lock(repo_dir):
            if (repo_dir / "repo.json").exists():
                return False
            sha256 = self.put_bytes(INITIAL_GITATTRIBUTES.encode())
            self.add_holder(repo_type, repo_id, [sha256])
            tree = {".gitattributes": self._entry(sha256, lfs=False)}
            sha = self._write_commit(repo_type, repo_id, None, tree, "initial commit", "", author)
            now = iso_now()
            state = {"type": repo_type, "id": repo_id, "private": private, "createdAt": now, "lastModified": now,
                     "branches": {DEFAULT_BRANCH: sha}, "tags": {}, "prs": {}}
            self._save_repo(repo_type, repo_id, state)
            return True

    def set_private(self, repo_type: str, repo_id: str, private: bool) -> None:
        """Change a repo's visibility."""
        with self._repo_lock(self.repo_dir(repo_type, repo_id)):
            state = self.load_repo(repo_type, repo_id)
            state["private"] = private
            self._save_repo(repo_type, repo_id, state)

    # ---- commits -------------------------------------------------------------------------------------------------
    def _entry(self, sha256: str, lfs: bool) -> dict[str, Any]:
        path = self.object_path(sha256)
        if not path.is_file():
            raise HubError(f"object {sha256} is not stored; upload the file content before committing it")
        size = path.stat().st_size
        oid = hashlib.sha1(lfs_pointer(sha256, size).encode()).hexdigest() if lfs else git_blob_sha1(path.read_bytes())
        return {"sha256": sha256, "size": size, "oid": oid, "lfs": lfs}

    def _write_commit(self, repo_type: str, repo_id: str, parent: str | None, tree: dict[str, Any], message: str,
                      description: str, author: str) -> str:
        # The id depends only on the repo, parent, tree and message, so it is reproducible and stable.
        canon = {"repo": f"{repo_type}:{repo_id}", "parent": parent, "message": message, "description": description,
                 "tree": {p: [e["sha256"], e["lfs"]] for p, e in tree.items()}}
        sha = hashlib.sha1(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        path = self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json"
        if not path.exists():
            commit = {"id": sha, "parent": parent, "message": message, "description": description, "author": author,
                      "date": iso_now(), "tree": dict(sorted(tree.items()))}
            atomic_write(path, json.dumps(commit).encode())
        return sha

    def get_commit(self, repo_type: str, repo_id: str, sha: str) -> dict[str, Any]:
        """A commit (``id``, ``parent``, ``message``, ``date``, ``tree``) by full sha; raises RevisionNotFound."""
        return _read_commit(self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json")

    def history(self, repo_type: str, repo_id: str, sha: str) -> Iterator[dict[str, Any]]:
        """Commits from ``sha`` back to the initial one, newest first."""
        current: str | None = sha
        while current:
            commit = self.get_commit(repo_type, repo_id, current)
            yield commit
            current = commit["parent"]

    def resolve(self, repo_type: str, repo_id: str, rev: str) -> str:
        """Full commit sha for a branch, tag, ``refs/...`` name, full sha or unique short sha prefix of this repo."""
        state = self.load_repo(repo_type, repo_id)
        for prefix, table in (("", "branches"), ("refs/heads/", "branches"), ("", "tags"), ("refs/tags/", "tags"),
                              ("refs/pr/", "prs")):
            if rev.startswith(prefix) and rev[len(prefix):] in state[table]:
                return state[table][rev[len(prefix):]]
        # Commits live in the repo's own folder, so a sha of another repo never resolves here.
        commits = self.repo_dir(repo_type, repo_id) / "commits"
        if _HEX40.fullmatch(rev) and (commits / f"{rev}.json").exists():
            return rev
        if _SHORT_SHA.fullmatch(rev):
            matches = [n[:-5] for n in os.listdir(commits) if n.startswith(rev) and n.endswith(".json")]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RevisionNotFound(f"short sha {rev!r} is ambiguous in {repo_id}; pass more characters")
        raise RevisionNotFound(f"revision {rev!r} not found in {repo_type} repo {repo_id}; "
                               f"branches: {sorted(state['branches'])}, tags: {sorted(state['tags'])}")

    def commit(self, repo_type: str, repo_id: str, rev: str, ops: list[Op], message: str, description: str = "",
               author: str = "", parent_commit: str | None = None, create_pr: bool = False) -> tuple[str, int | None]:
        """Apply ``ops`` on top of branch ``rev`` (or open a PR from ``rev``) and return (commit sha, PR number).

        The caller has checked that the repo may use every object an ``add`` op names (see ``holds``).
        """
        repo_dir = self.repo_dir(repo_type, repo_id)
        with self._repo_lock(repo_dir):
            state = self.load_repo(repo_type, repo_id)
            branch = rev.removeprefix("refs/heads/")
            if create_pr:
                head = self.resolve(repo_type, repo_id, rev)
            elif branch in state["branches"]:
                head = state["branches"][branch]
            else:
                self.resolve(repo_type, repo_id, rev)  # raises RevisionNotFound for unknown revisions
                raise HubError(f"cannot commit to {rev!r} of {repo_id}: it is not a branch; commit to a branch "
                               f"({sorted(state['branches'])}) or create one with create_branch")
            if parent_commit and parent_commit != head:
                raise HubError(f"parentCommit {parent_commit} is not the head of {rev!r} ({head}); someone else "
                               "committed in between: fetch the new head and retry", status=412)
            tree = _apply_ops(dict(self.get_commit(repo_type, repo_id, head)["tree"]), ops, self._entry)
            # Objects of the parent tree are indexed already; only the added ones are new to this repo.
            self.add_holder(repo_type, repo_id, (op.sha256 for op in ops if op.kind == "add" and op.sha256))
            sha = self._write_commit(repo_type, repo_id, head, tree, message, description, author)
            pr_num = None
            if create_pr:
                pr_num = max(map(int, state["prs"]), default=0) + 1
                state["prs"][str(pr_num)] = sha
            else:
                state["branches"][branch] = sha
            state["lastModified"] = iso_now()
            self._save_repo(repo_type, repo_id, state)
            return sha, pr_num

    # ---- refs ----------------------------------------------------------------------------------------------------
    def set_ref(self, repo_type: str, repo_id: str, kind: Literal["branches", "tags"], name: str,
                start: str | None, exist_ok: bool = False) -> str | None:
        """Point branch/tag ``name`` at revision ``start`` of this repo, or delete it when ``start`` is None."""
        with self._repo_lock(self.repo_dir(repo_type, repo_id)):
            state = self.load_repo(repo_type, repo_id)
            what = "branch" if kind == "branches" else "tag"
            if start is None:
                if name not in state[kind]:
                    raise RevisionNotFound(f"{what} {name!r} not found in {repo_id}; existing: {sorted(state[kind])}")
                if kind == "branches" and name == DEFAULT_BRANCH:
                    raise HubError(f"cannot delete the default branch {DEFAULT_BRANCH!r} of {repo_id}", status=403)
                del state[kind][name]
                sha = None
            else:
                check_ref_name(name, what)
                sha = self.resolve(repo_type, repo_id, start)
                if name in state[kind] and not exist_ok:
                    raise Conflict(f"{what} {name!r} already exists in {repo_id}; pick another name or delete it")
                state[kind][name] = sha
            self._save_repo(repo_type, repo_id, state)
            return sha


def _apply_ops(tree: dict[str, Any], ops: list[Op], make_entry: Callable[[str, bool], dict[str, Any]]) -> dict:
    dirs: set[str] | None = None
    for op in ops:
        path = op.path.strip("/") if op.kind == "delete_folder" else check_repo_path(op.path)
        if op.kind == "add":
            if dirs is None:
                dirs = {p.rsplit("/", i)[0] for p in tree for i in range(1, p.count("/") + 1)}
            parents = [path.rsplit("/", i)[0] for i in range(1, path.count("/") + 1)]
            if path in dirs or any(p in tree for p in parents):
                raise HubError(f"cannot add {path!r}: a folder and a file would share a path; rename one of them")
            tree[path] = make_entry(op.sha256 or "", op.lfs)
            dirs.update(parents)
        elif op.kind == "delete_file":
            if tree.pop(path, None) is None:
                raise EntryNotFound(f"cannot delete {path!r}: A file with this name doesn't exist")
            dirs = None
        else:
            doomed = [p for p in tree if not path or p.startswith(path + "/")]
            if not doomed:
                raise EntryNotFound(f"cannot delete folder {path!r}: A file with this name doesn't exist")
            for p in doomed:
                del tree[p]
            dirs = None
    return tree


@lru_cache(maxsize=512)
def _read_commit(path: Path) -> dict[str, Any]:
    # Commits are immutable once written, so caching them by path is safe.
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RevisionNotFound(f"commit {path.stem} not found") from None
