"""Download-side routes: resolve (file contents, with Range), repo info, tree, paths-info, refs and commits."""

from __future__ import annotations

import hashlib
import mimetypes
import re
from typing import Any
from urllib.parse import parse_qs, unquote

from hubtune.localhub.auth import check_repo
from hubtune.localhub.body import field
from hubtune.localhub.errors import EntryNotFound, HubError
from hubtune.localhub.formats import card_data, list_tree, tree_entry
from hubtune.localhub.request import Request, split_rev

_CHUNK = 1 << 20


def commit_at(req: Request, repo_type: str, repo_id: str, rev: str) -> dict[str, Any]:
    """The commit a revision of the repo points at."""
    return req.store.get_commit(repo_type, repo_id, req.store.resolve(repo_type, repo_id, rev))


def resolve(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``HEAD|GET {P}{repo}/resolve/{rev}/{path}``: a file's content, whole or a byte range."""
    check_repo(req, repo_type, repo_id)
    rev, rest = split_rev(segs)
    path = "/".join(unquote(s) for s in rest)
    sha = req.store.resolve(repo_type, repo_id, rev)
    entry = req.store.get_commit(repo_type, repo_id, sha)["tree"].get(path)
    if entry is None:
        raise EntryNotFound(f"{path!r} not found in {repo_id} at {rev!r}", headers={"X-Repo-Commit": sha})
    size = entry["size"]
    etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
    headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
    if entry["lfs"]:
        headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
    start, end, status = 0, size - 1, 200
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("Range", "").strip())
    if match and (match[1] or match[2]):
        if match[1]:
            start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
        else:
            start = max(size - int(match[2]), 0)
        if start >= size or start > end:
            req.send(416, headers={**headers, "Content-Range": f"bytes */{size}"})
            return
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers.update({"Content-Length": str(end - start + 1),
                    "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream"})
    req.start(status, headers)
    if req.method == "HEAD":
        return
    with open(req.store.object_path(entry["sha256"]), "rb") as f:
        f.seek(start)
        remaining = end - start + 1
        while remaining > 0 and (chunk := f.read(min(_CHUNK, remaining))):
            req.write(chunk)
            remaining -= len(chunk)


def info(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``GET /api/{t}s/{repo}[/revision/{rev}]``: repo info at a revision."""
    repo = check_repo(req, repo_type, repo_id)
    commit = commit_at(req, repo_type, repo_id, split_rev(segs)[0])
    card = card_data(req.store, commit["tree"])
    siblings = []
    for path, entry in commit["tree"].items():
        sibling: dict[str, Any] = {"rfilename": path}
        if req.arg("blobs") == "true":
            sibling.update(size=entry["size"], blobId=entry["oid"])
            if entry["lfs"]:
                sibling["lfs"] = tree_entry(path, entry)["lfs"] | {"sha256": entry["sha256"]}
        siblings.append(sibling)
    tags = [t for t in (card or {}).get("tags") or [] if isinstance(t, str)]
    out = {"_id": hashlib.sha1(f"{repo_type}:{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
           "author": repo_id.split("/")[0], "sha": commit["id"], "private": repo["private"], "gated": False,
           "disabled": False, "lastModified": commit["date"], "createdAt": repo["createdAt"], "tags": tags,
           "downloads": 0, "likes": 0, "siblings": siblings}
    if card is not None:
        out["cardData"] = card
    if repo_type == "model":
        out.update(modelId=repo_id, library_name=(card or {}).get("library_name"),
                   pipeline_tag=(card or {}).get("pipeline_tag"))
    req.json(out)


def _page(req: Request, items: list[Any], page_size: int, params: str) -> None:
    start = req.int_arg("cursor", 0)
    headers = {}
    if start + page_size < len(items):
        headers["Link"] = f'<{req.base()}{req.path}?{params}cursor={start + page_size}>; rel="next"'
    req.json(items[start:start + page_size], headers=headers)


def _expand(req: Request, repo_type: str, repo_id: str, commit: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """Add ``lastCommit`` (the newest commit that changed each entry) and a security status to ``items``."""
    history = list(req.store.history(repo_type, repo_id, commit["id"]))
    for item in items:
        path = item["path"]

        def key(c: dict[str, Any], path: str = path) -> Any:
            return sorted((p, e["oid"]) for p, e in c["tree"].items() if p == path or p.startswith(path + "/"))

        last, current = history[0], key(history[0])
        for older in history[1:]:
            if key(older) != current:
                break
            last = older
        item["lastCommit"] = {"id": last["id"], "title": last["message"], "date": last["date"]}
        if item["type"] == "file":
            item["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False}, "pickleImportScan": None}


def tree(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``GET /api/{t}s/{repo}/tree/{rev}[/{path}]``: a paged listing, directories first."""
    check_repo(req, repo_type, repo_id)
    rev, rest = split_rev(segs)
    commit = commit_at(req, repo_type, repo_id, rev)
    recursive, expand = req.arg("recursive") == "true", req.arg("expand") == "true"
    items = list_tree(commit["tree"], "/".join(unquote(s) for s in rest).strip("/"), recursive)
    page_size = min(req.hub.page_size, 50) if expand else req.hub.page_size
    start = req.int_arg("cursor", 0)
    if expand:
        _expand(req, repo_type, repo_id, commit, items[start:start + page_size])
    _page(req, items, page_size, f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&")


def paths_info(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST /api/{t}s/{repo}/paths-info/{rev}``: tree entries of the listed paths that exist."""
    check_repo(req, repo_type, repo_id)
    commit = commit_at(req, repo_type, repo_id, split_rev(segs)[0])
    if "json" in req.headers.get("Content-Type", ""):
        form = req.json_body("paths-info body")
        paths = field(form, "paths", (list, str), "paths-info body", [])
        paths, expand = [paths] if isinstance(paths, str) else paths, str(form.get("expand", "")).lower() == "true"
        if not all(isinstance(p, str) for p in paths):
            raise HubError("paths-info body: 'paths' must be a list of strings")
    else:
        try:
            form = parse_qs(req.body().decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise HubError("paths-info body is not valid UTF-8 form data (paths=...&expand=...)") from None
        paths, expand = form.get("paths", []), form.get("expand", ["false"])[0] == "true"
    files, items = commit["tree"], []
    for path in dict.fromkeys(p.strip("/") for p in paths):
        if path in files:
            items.append(tree_entry(path, files[path]))
        elif any(p.startswith(path + "/") for p in files):
            items.append(next(d for d in list_tree(files, "", True) if d["path"] == path))
    if expand:
        _expand(req, repo_type, repo_id, commit, items)
    req.json(items)


def refs(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``GET /api/{t}s/{repo}/refs``: branches, tags, converts (and PRs with ``include_prs``)."""
    repo = check_repo(req, repo_type, repo_id)
    out: dict[str, Any] = {
        kind: [{"name": n, "ref": f"refs/{ref}/{n}", "targetCommit": sha} for n, sha in sorted(repo[key].items())]
        for kind, key, ref in (("branches", "branches", "heads"), ("tags", "tags", "tags"))
    }
    out["converts"] = []
    if req.arg("include_prs") in ("1", "true"):
        out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": sha}
                               for n, sha in sorted(repo["prs"].items(), key=lambda kv: int(kv[0]))]
    req.json(out)


def commits(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``GET /api/{t}s/{repo}/commits/{rev}``: the history, newest first, paged."""
    check_repo(req, repo_type, repo_id)
    sha = req.store.resolve(repo_type, repo_id, split_rev(segs)[0])
    items = [{"id": c["id"], "title": c["message"], "message": c["description"], "date": c["date"],
              "authors": [{"user": c["author"]}] if c["author"] else []}
             for c in req.store.history(repo_type, repo_id, sha)]
    _page(req, items, req.hub.page_size, "")
