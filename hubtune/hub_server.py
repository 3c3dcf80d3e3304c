"""A local Hugging Face Hub-compatible HTTP server for tests and offline work (see design/hub-protocol.md).

Point the real clients at it with ``HF_ENDPOINT`` (set before importing them) and ``HF_HUB_DISABLE_XET=1``:
``LocalHub.env()`` returns the full environment. Storage lives in :mod:`hubtune.hub_store`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import yaml

from hubtune.hub_store import (
    INITIAL_GITATTRIBUTES,
    EntryNotFound,
    HubError,
    HubStore,
    Op,
    RepoNotFound,
    lfs_pointer,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = tuple(line.split()[0][1:] for line in INITIAL_GITATTRIBUTES.splitlines())
CARD_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
XET_MESSAGE = ("This local Hub has no Xet storage. Set HF_HUB_DISABLE_XET=1 in the client environment "
               "(LocalHub.env() does) so uploads and downloads use plain HTTP and LFS.")
UPLOAD_TTL_S = 3600


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut idle keep-alive connections so no handler thread outlives the server."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubtune-localhub"
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out in separate writes; Nagle would delay each by ~40 ms
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        self.hub: LocalHub = self.server.hub
        self.store = self.hub.store
        self._method, self._status, self._sent, self._body_done = method, 0, False, False
        self._read: Callable[[int], bytes] | None = None
        self._rid = self.headers.get("X-Request-Id") or self.headers.get("X-Amzn-Trace-Id") or uuid.uuid4().hex
        self._path, _, query = self.path.partition("?")
        self._query = parse_qs(query, keep_blank_values=True)
        try:
            try:
                if self.hub.before_request is not None:
                    self.hub.before_request(method, unquote(self._path))
                self._route(method, self._path.split("/")[1:])
            except HubError as err:
                self._error(err)
            except (ConnectionError, TimeoutError):
                raise
            except Exception:
                logger.exception("local hub failed on %s %s", method, self._path)
                self._error(HubError("internal error in the local hub; see the server log", status=500))
        except (ConnectionError, TimeoutError):  # the client went away mid-transfer
            self.close_connection = True
        finally:
            self.hub._record(method, self._path, self._status, self.headers.get("Range"))

    def _arg(self, name: str, default: str = "") -> str:
        return self._query.get(name, [default])[0]

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    def _reader(self) -> Callable[[int], bytes]:
        if self._read is None:
            self._read = self._make_reader()
        return self._read

    def _make_reader(self) -> Callable[[int], bytes]:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            remaining = int(self.headers.get("Content-Length") or 0)

            def read(n: int) -> bytes:
                nonlocal remaining
                data = self.rfile.read(min(n, remaining)) if remaining > 0 else b""
                remaining -= len(data)
                self._body_done = remaining <= 0 or not data
                return data

            return read
        buf, done = bytearray(), False

        def read_chunked(n: int) -> bytes:
            nonlocal done
            while len(buf) < n and not done:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    done = self._body_done = True
                else:
                    buf.extend(self.rfile.read(size))
                    self.rfile.readline()
            data = bytes(buf[:n])
            del buf[:n]
            return data

        return read_chunked

    def _body(self) -> bytes:
        read, chunks = self._reader(), []
        while chunk := read(1 << 20):
            chunks.append(chunk)
        self._body_done = True
        return b"".join(chunks)

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(f"request body is not valid JSON: {err}") from None

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self._status, self._sent = status, True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", self._rid)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        has_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if has_body and not self._body_done:
            self.close_connection = True  # unread request body: the connection cannot be reused
            self.send_header("Connection", "close")
        self.end_headers()
        if self._method != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), content_type, headers)

    def _error(self, err: HubError) -> None:
        if self._sent:
            self.close_connection = True
            return
        message = re.sub(r"[\r\n]+", " ", err.message).encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": message}
        headers.update(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message, **err.extra}, err.status, headers)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.server.hub.quiet:  # path only: the query can hold an upload signature, headers hold tokens
            logger.info("%s %s %s -> %s", self.address_string(), self.command, self.path.split("?")[0], code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.server.hub.quiet:
            logger.info("%s %s", self.address_string(), re.sub(r"\?\S*", "?...", format % args))

    # ---- auth ----------------------------------------------------------------------------------------------------
    def _user(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError("Invalid credentials in Authorization header", status=401)
        return self.hub.tokens[token]

    def _owns(self, user: str, namespace: str) -> bool:
        return namespace == user or namespace in self.hub.orgs.get(user, ())

    def _writer(self) -> str:
        ident = self._user()
        if ident is None:
            raise HubError("this operation needs a write token: pass token=... or set HF_TOKEN", status=401)
        if ident[1] != "write":
            raise HubError(f"the token of user {ident[0]!r} is read-only; use a write token for this operation",
                           status=403)
        return ident[0]

    def _repo(self, rtype: str, repo_id: str, write: bool = False) -> dict[str, Any]:
        user = self._writer() if write else (self._user() or ("", ""))[0]
        repo = self.store.load_repo(rtype, repo_id)
        ns = repo_id.split("/")[0]
        if repo["private"] and not (user and self._owns(user, ns)):
            hint = "pass a token with access" if user else "it may be private: pass a token (HF_TOKEN)"
            raise RepoNotFound(f"{rtype} repo {repo_id!r} not found; {hint}", status=404 if user else 401)
        if write and not self._owns(user, ns):
            raise HubError(f"user {user!r} cannot write to {repo_id!r}: namespace {ns!r} is neither the user nor "
                           f"one of their orgs ({sorted(self.hub.orgs.get(user, ()))})", status=403)
        return repo

    # ---- routing -------------------------------------------------------------------------------------------------
    def _route(self, method: str, segs: list[str]) -> None:
        if segs[:1] == ["api"]:
            return self._route_api("GET" if method == "HEAD" else method, segs[1:])
        rtype = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            rtype, segs = segs[0][:-1], segs[1:]
        if len(segs) >= 4 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(rtype, f"{unquote(segs[0])}/{unquote(segs[1])}", segs[3:])
        if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            repo_id, action = f"{unquote(segs[0])}/{unquote(segs[1])[:-4]}", segs[5:]
            if method == "POST" and action == ["batch"]:
                return self._lfs_batch(rtype, repo_id)
            if method == "POST" and action == ["verify"]:
                return self._lfs_verify(rtype, repo_id)
            if method == "PUT" and len(action) == 2 and action[0] == "upload":
                return self._lfs_put(rtype, repo_id, action[1])
        raise HubError(f"no route for {method} {unquote(self._path)} on this local hub", status=404)

    def _route_api(self, method: str, segs: list[str]) -> None:
        simple = {("GET", "whoami-v2"): self._whoami, ("POST", "validate-yaml"): self._validate_yaml,
                  ("GET", "agent-harnesses"): lambda: self._json({"standardEnvVars": [], "harnesses": {}}),
                  ("POST", "repos/create"): self._create_repo}
        if (method, "/".join(segs)) in simple:
            return simple[(method, "/".join(segs))]()
        if len(segs) >= 3 and segs[0] in ("models", "datasets", "spaces"):
            rtype, repo_id, rest = segs[0][:-1], f"{unquote(segs[1])}/{unquote(segs[2])}", segs[3:]
            action = rest[0] if rest else "revision"
            handler = {("GET", "revision"): self._info, ("GET", "tree"): self._tree, ("GET", "refs"): self._refs,
                       ("GET", "commits"): self._commits, ("POST", "paths-info"): self._paths_info,
                       ("POST", "preupload"): self._preupload, ("POST", "commit"): self._commit,
                       ("POST", "branch"): self._branch, ("DELETE", "branch"): self._branch,
                       ("POST", "tag"): self._tag, ("DELETE", "tag"): self._tag,
                       ("PUT", "settings"): self._settings}.get((method, action))
            if action in ("xet-read-token", "xet-write-token"):
                raise HubError(XET_MESSAGE, status=404)
            if handler is not None:
                return handler(rtype, repo_id, rest[1:])
        raise HubError(f"no route for {method} {unquote(self._path)} on this local hub", status=404)

    @staticmethod
    def _split_rev(segs: list[str], default: str = "main") -> tuple[str, list[str]]:
        """Split a revision (one encoded segment, or literal ``refs/pr/N``-style) off the path segments."""
        if not segs or not segs[0]:
            return default, segs[1:]
        if unquote(segs[0]) == "refs" and len(segs) >= 3 and segs[1] in ("pr", "convert", "heads", "tags"):
            return f"refs/{segs[1]}/{unquote(segs[2])}", segs[3:]
        return unquote(segs[0]), segs[1:]

    def _prefix(self, rtype: str) -> str:
        return "" if rtype == "model" else f"{rtype}s/"

    # ---- download side -------------------------------------------------------------------------------------------
    def _resolve(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id)
        rev, rest = self._split_rev(segs)
        path = "/".join(unquote(s) for s in rest)
        sha = self.store.resolve(rtype, repo_id, rev)
        entry = self.store.get_commit(rtype, repo_id, sha)["tree"].get(path)
        if entry is None:
            raise EntryNotFound(f"{path!r} not found in {repo_id} at {rev!r}", headers={"X-Repo-Commit": sha})
        size = entry["size"]
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:
                start = max(size - int(match[2]), 0)
            if start >= size or start > end:
                self._send(416, headers={**headers, "Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._status, self._sent = status, True
        self.send_response(status)
        headers.update({"Content-Length": str(end - start + 1), "X-Request-Id": self._rid,
                        "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream"})
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self._method == "HEAD":
            return
        with open(self.store.object_path(entry["sha256"]), "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _commit_at(self, rtype: str, repo_id: str, rev: str) -> dict[str, Any]:
        return self.store.get_commit(rtype, repo_id, self.store.resolve(rtype, repo_id, rev))

    def _info(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        repo = self._repo(rtype, repo_id)
        commit = self._commit_at(rtype, repo_id, self._split_rev(segs)[0])
        card = card_data(self.store, commit["tree"])
        siblings = []
        for path, entry in commit["tree"].items():
            sibling: dict[str, Any] = {"rfilename": path}
            if self._arg("blobs") == "true":
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = tree_entry(path, entry)["lfs"] | {"sha256": entry["sha256"]}
            siblings.append(sibling)
        tags = [t for t in (card or {}).get("tags") or [] if isinstance(t, str)]
        info = {"_id": hashlib.sha1(f"{rtype}:{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
                "author": repo_id.split("/")[0], "sha": commit["id"], "private": repo["private"], "gated": False,
                "disabled": False, "lastModified": commit["date"], "createdAt": repo["createdAt"], "tags": tags,
                "downloads": 0, "likes": 0, "siblings": siblings}
        if card is not None:
            info["cardData"] = card
        if rtype == "model":
            info.update(modelId=repo_id, library_name=(card or {}).get("library_name"),
                        pipeline_tag=(card or {}).get("pipeline_tag"))
        self._json(info)

    def _page(self, items: list[Any], page_size: int, params: str) -> None:
        start = int(self._arg("cursor", "0") or 0)
        headers = {}
        if start + page_size < len(items):
            headers["Link"] = f'<{self._base()}{self._path}?{params}cursor={start + page_size}>; rel="next"'
        self._json(items[start:start + page_size], headers=headers)

    def _expand(self, rtype: str, repo_id: str, commit: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Add ``lastCommit`` (the newest commit that changed each entry) and a security status to ``items``."""
        history = list(self.store.history(rtype, repo_id, commit["id"]))
        for item in items:
            path = item["path"]

            def key(c: dict[str, Any]) -> Any:
                return sorted((p, e["oid"]) for p, e in c["tree"].items() if p == path or p.startswith(path + "/"))

            last, current = history[0], key(history[0])
            for older in history[1:]:
                if key(older) != current:
                    break
                last = older
            item["lastCommit"] = {"id": last["id"], "title": last["message"], "date": last["date"]}
            if item["type"] == "file":
                item["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                              "pickleImportScan": None}

    def _tree(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id)
        rev, rest = self._split_rev(segs)
        commit = self._commit_at(rtype, repo_id, rev)
        recursive, expand = self._arg("recursive") == "true", self._arg("expand") == "true"
        items = list_tree(commit["tree"], "/".join(unquote(s) for s in rest).strip("/"), recursive)
        page_size = min(self.hub.page_size, 50) if expand else self.hub.page_size
        start = int(self._arg("cursor", "0") or 0)
        if expand:
            self._expand(rtype, repo_id, commit, items[start:start + page_size])
        self._page(items, page_size, f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&")

    def _paths_info(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id)
        commit = self._commit_at(rtype, repo_id, self._split_rev(segs)[0])
        raw = self._body()
        if "json" in self.headers.get("Content-Type", ""):
            form = json.loads(raw or b"{}")
            paths, expand = form.get("paths", []), str(form.get("expand", "")).lower() == "true"
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0] == "true"
        tree, items = commit["tree"], []
        for path in dict.fromkeys(p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)):
            if path in tree:
                items.append(tree_entry(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                items.append(next(d for d in list_tree(tree, "", True) if d["path"] == path))
        if expand:
            self._expand(rtype, repo_id, commit, items)
        self._json(items)

    def _refs(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        repo = self._repo(rtype, repo_id)
        out: dict[str, Any] = {
            kind: [{"name": n, "ref": f"refs/{ref}/{n}", "targetCommit": sha} for n, sha in sorted(repo[key].items())]
            for kind, key, ref in (("branches", "branches", "heads"), ("tags", "tags", "tags"))
        }
        out["converts"] = []
        if self._arg("include_prs") in ("1", "true"):
            out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": sha}
                                   for n, sha in sorted(repo["prs"].items(), key=lambda kv: int(kv[0]))]
        self._json(out)

    def _commits(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id)
        sha = self.store.resolve(rtype, repo_id, self._split_rev(segs)[0])
        items = [{"id": c["id"], "title": c["message"], "message": c["description"], "date": c["date"],
                  "authors": [{"user": c["author"]}] if c["author"] else []}
                 for c in self.store.history(rtype, repo_id, sha)]
        self._page(items, self.hub.page_size, "")

    def _whoami(self) -> None:
        ident = self._user()
        if ident is None:
            raise HubError("Invalid user token: no Authorization header was sent", status=401)
        user, role = ident
        self._json({"type": "user", "name": user, "fullname": user, "email": None,
                    "orgs": [{"type": "org", "name": o} for o in sorted(self.hub.orgs.get(user, ()))],
                    "auth": {"type": "access_token", "accessToken": {"displayName": f"{user}-{role}", "role": role}}})

    # ---- upload side ---------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        user, body = self._writer(), self._json_body()
        rtype, ns, name = body.get("type") or "model", body.get("organization") or user, body.get("name")
        if not isinstance(name, str):
            raise HubError("repos/create needs a JSON body with a string 'name'")
        if not self._owns(user, ns):
            raise HubError(f"user {user!r} cannot create repos in namespace {ns!r}: it is neither the user nor one "
                           f"of their orgs ({sorted(self.hub.orgs.get(user, ()))})", status=403)
        repo_id = f"{ns}/{name}"
        private = bool(body["private"]) if body.get("private") is not None else body.get("visibility") == "private"
        url = f"{self._base()}/{self._prefix(rtype)}{repo_id}"
        if not self.store.create_repo(rtype, repo_id, private, user):
            raise HubError(f"You already created this {rtype} repo: {repo_id}", status=409, extra={"url": url})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _settings(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id, write=True)
        body = self._json_body()
        if body.get("gated") not in (None, False):
            raise HubError("gated repos are not supported by the local hub; leave `gated` unset or False")
        private = body.get("private") if body.get("private") is not None else body.get("visibility")
        if private is not None:
            self.store.set_private(rtype, repo_id, private in (True, "private"))
        self._json({})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content") or ""
        match = CARD_RE.search(content)
        try:
            data = yaml.safe_load(match.group(2)) if match else None
        except yaml.YAMLError as err:
            problem = f"Invalid YAML in README.md metadata: {err}"
        else:
            if data is None or isinstance(data, dict):
                return self._json({"errors": [], "warnings": []})
            problem = f"README.md metadata must be a YAML mapping (key: value lines), got a {type(data).__name__}"
        self._json({"errors": [{"message": problem}], "warnings": []}, status=400)

    def _preupload(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id, write=True)
        tree = self._commit_at(rtype, repo_id, self._split_rev(segs)[0])["tree"]
        out = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            mode = upload_mode(path, size, base64.b64decode(item.get("sample", "") or ""))
            result = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            current = tree.get(path)
            if current is not None and current["lfs"] == (mode == "lfs"):
                result["oid"] = current["sha256"] if current["lfs"] else current["oid"]
            out.append(result)
        self._json({"files": out})

    def _commit(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        user = self._writer()
        self._repo(rtype, repo_id, write=True)
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
            ops = [self._commit_op(line["key"], line["value"]) for line in lines[1:]]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise HubError(f"malformed commit body ({err!r}): expected NDJSON with a header line first") from None
        if header is None:
            raise HubError("malformed commit body: the first NDJSON line must be {'key': 'header', ...}")
        create_pr = self._arg("create_pr") in ("1", "true")
        sha, pr = self.store.commit(rtype, repo_id, self._split_rev(segs)[0], ops, header.get("summary") or "",
                                    header.get("description") or "", user, header.get("parentCommit"), create_pr)
        repo_url = f"{self._base()}/{self._prefix(rtype)}{repo_id}"
        self._json({"commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}", "success": True,
                    "pullRequestUrl": f"{repo_url}/discussions/{pr}" if pr else None})

    def _commit_op(self, key: str, value: dict[str, Any]) -> Op:
        path = value["path"]
        if key == "file":
            content = value["content"]
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            return Op("add", path, self.store.put_bytes(data))
        if key == "lfsFile":
            oid, size = value["oid"], value.get("size")
            if not self.store.has_object(oid, size):
                raise HubError(f"LFS object {oid} for {path!r} was not uploaded (or has another size); upload it "
                               "through the LFS batch endpoint before committing")
            return Op("add", path, oid, lfs=True)
        if key in ("deletedFile", "deletedFolder"):
            return Op("delete_file" if key == "deletedFile" else "delete_folder", path)
        raise HubError(f"unsupported commit operation {key!r}: use file, lfsFile, deletedFile or deletedFolder")

    def _branch(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id, write=True)
        name = "/".join(unquote(s) for s in segs)
        start = (self._json_body().get("startingPoint") or "main") if self._method == "POST" else None
        self.store.set_ref(rtype, repo_id, "branches", name, start)
        self._json({})

    def _tag(self, rtype: str, repo_id: str, segs: list[str]) -> None:
        self._repo(rtype, repo_id, write=True)
        if self._method == "DELETE":
            self.store.set_ref(rtype, repo_id, "tags", "/".join(unquote(s) for s in segs), None)
        else:
            tag = self._json_body().get("tag")
            if not isinstance(tag, str):
                raise HubError("tag creation needs a JSON body with a string 'tag'")
            self.store.set_ref(rtype, repo_id, "tags", tag, self._split_rev(segs)[0])
        self._json({})

    # ---- LFS -----------------------------------------------------------------------------------------------------
    def _signature(self, oid: str, size: int, expires: int, nonce: str) -> str:
        message = f"{oid}:{size}:{expires}:{nonce}".encode()
        return hmac.new(self.hub._secret, message, hashlib.sha256).hexdigest()

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        self._repo(rtype, repo_id, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(f"LFS batch operation {body.get('operation')!r} is not supported; only 'upload' is")
        repo_url = f"{self._base()}/{self._prefix(rtype)}{quote(repo_id)}.git/info/lfs/objects"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "oid must be a sha256 hex digest, size an int"}})
            elif self.store.has_object(oid, size):
                objects.append({"oid": oid, "size": size})
            else:
                expires, nonce = int(time.time()) + UPLOAD_TTL_S, uuid.uuid4().hex
                query = f"size={size}&expires={expires}&nonce={nonce}&sig={self._signature(oid, size, expires, nonce)}"
                objects.append({"oid": oid, "size": size, "actions": {
                    "upload": {"href": f"{repo_url}/upload/{oid}?{query}", "expires_in": UPLOAD_TTL_S},
                    "verify": {"href": f"{repo_url}/verify"}}})
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, rtype: str, repo_id: str, oid: str) -> None:
        size, expires, nonce = int(self._arg("size", "-1")), int(self._arg("expires", "0")), self._arg("nonce")
        if not hmac.compare_digest(self._arg("sig"), self._signature(oid, size, expires, nonce)):
            raise HubError("upload URL signature is invalid; request a new one from the LFS batch endpoint",
                           status=403)
        if expires < time.time() or nonce in self.hub._used_nonces:
            raise HubError("upload URL expired or already used; request a new one from the LFS batch endpoint",
                           status=403)
        if not self.store.has_object(oid, size):
            self.store.put_stream(self._reader(), size, oid)
        self._body()  # drain anything past the declared size
        self.hub._used_nonces.add(nonce)
        self._send(200)

    def _lfs_verify(self, rtype: str, repo_id: str) -> None:
        self._repo(rtype, repo_id, write=True)
        body = self._json_body()
        if not self.store.has_object(str(body.get("oid")), body.get("size")):
            raise HubError(f"LFS object {body.get('oid')} of size {body.get('size')} is not stored; upload it again",
                           status=404)
        self._json({"message": "verified"})


class LocalHub:
    """A Hub-compatible server over a storage root, served from a daemon thread; use as a context manager."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 tokens: dict[str, tuple[str, str]] | None = None, quiet: bool = True,
                 orgs: dict[str, list[str]] | None = None, page_size: int = 1000) -> None:
        """Configure the server; nothing listens until ``start()``.

        Args:
            root: storage directory (created if missing); a restart over the same root serves the same commits.
            host: interface to bind; the loopback address by default.
            port: TCP port; 0 picks a free one.
            tokens: token -> (user name, "read" | "write").
            quiet: when False, log one line per request (never the Authorization header or query string).
            orgs: user name -> org namespaces that user may write to.
            page_size: entries per page of tree and commit listings (the Hub uses 1000).
        """
        for token, (user, role) in (tokens or {}).items():
            if role not in ("read", "write") or not user:
                raise ValueError(f"token role for user {user!r} must be 'read' or 'write', got {role!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.root, self.host, self.port = Path(root), host, port
        self.store = HubStore(root)
        self.tokens = dict(tokens or {})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.quiet, self.page_size = quiet, page_size
        self.url = ""
        # Recent (method, decoded path, status, Range header) for tests; never headers or query strings.
        self.requests: deque[tuple[str, str, int, str | None]] = deque(maxlen=5000)
        # Tests inject faults here: called with (method, decoded path) before routing; raising ConnectionError
        # drops the connection without an answer, as a server that dies mid-request would.
        self.before_request: Callable[[str, str], None] | None = None
        self._secret = os.urandom(32)
        self._used_nonces: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _record(self, method: str, path: str, status: int, range_header: str | None) -> None:
        self.requests.append((method, unquote(path), status, range_header))

    def start(self) -> LocalHub:
        """Bind and serve in a daemon thread; ``url`` is valid afterwards."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"localhub-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point the HF clients at this server (set them before importing the clients)."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30",
               "NO_PROXY": no_proxy}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def parse_tokens(specs: list[str], tokens_file: str | None) -> dict[str, tuple[str, str]]:
    """Tokens from ``NAME=VALUE[:read|write]`` specs and a JSON or one-spec-per-line file; role defaults to write."""
    lines = list(specs)
    tokens: dict[str, tuple[str, str]] = {}
    if tokens_file:
        text = Path(tokens_file).read_text()
        if text.lstrip().startswith(("{", "[")):
            data = json.loads(text)
            items = data.items() if isinstance(data, dict) else ((d["token"], d) for d in data)
            for token, value in items:
                user, role = (value["user"], value.get("role", "write")) if isinstance(value, dict) else value
                tokens[token] = (user, role)
        else:
            lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for spec in lines:
        user, sep, value = spec.partition("=")
        role = "write"
        if value.rsplit(":", 1)[-1] in ("read", "write") and ":" in value:
            value, role = value.rsplit(":", 1)
        if not sep or not user or not value:
            raise ValueError(f"--token must look like NAME=VALUE[:read|write] (NAME is the user), got {spec!r}")
        tokens[value] = (user, role)
    return tokens


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hub serve`` options to ``parser``."""
    parser.add_argument("--root", required=True, help="storage directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one")
    parser.add_argument("--token", action="append", default=[], metavar="NAME=VALUE[:read|write]",
                        help="accept token VALUE for user NAME (role defaults to write); repeatable")
    parser.add_argument("--tokens-file", metavar="FILE",
                        help='JSON {"token": ["user", "role"]} or one NAME=VALUE[:role] per line')
    parser.add_argument("--org", action="append", default=[], metavar="USER=ORG[,ORG...]",
                        help="let USER write to the ORG namespaces; repeatable")
    parser.add_argument("--page-size", type=int, default=1000, help="entries per page of tree listings")
    parser.add_argument("--log-requests", action="store_true", help="log one line per request to stderr")


def run_serve(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT/SIGTERM, after printing the client environment; return 0."""
    orgs: dict[str, list[str]] = {}
    for spec in args.org:
        user, sep, names = spec.partition("=")
        if not sep or not user or not names:
            raise ValueError(f"--org must look like USER=ORG[,ORG...], got {spec!r}")
        orgs.setdefault(user, []).extend(n for n in names.split(",") if n)
    tokens = parse_tokens(args.token, args.tokens_file)
    if args.log_requests:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hub = LocalHub(args.root, args.host, args.port, tokens, quiet=not args.log_requests, orgs=orgs,
                   page_size=args.page_size).start()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        write_token = next((t for t, (_, role) in tokens.items() if role == "write"), None)
        print(f"# local Hub serving {hub.store.root} at {hub.url}; stop with Ctrl-C", flush=True)
        for key, value in hub.env(write_token).items():
            print(f"export {key}={value}", flush=True)
        for token, (user, role) in tokens.items():
            print(f"# token for {user} ({role}): {token}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        hub.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m hubtune.hub_server", description=run_serve.__doc__)
    add_serve_arguments(_parser)
    _args = _parser.parse_args()
    try:
        raise SystemExit(run_serve(_args))
    except ValueError as _err:
        _parser.error(str(_err))
