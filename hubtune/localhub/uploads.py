"""Upload-side routes: preupload, commit, and the git-LFS batch / upload / verify endpoints.

A commit may name an LFS object by its sha256 only if the repo may use it (``auth.may_use_object``); otherwise the
client must upload the bytes, through an upload URL signed for this repo. The same answer is given whether or not
the object exists elsewhere, so neither endpoint tells a writer what other repos contain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote

from hubtune.localhub.auth import check_repo, may_use_object, require_writer
from hubtune.localhub.body import LIMIT_HINTS, as_object, field, human_size, ndjson_objects
from hubtune.localhub.downloads import commit_at
from hubtune.localhub.errors import HubError
from hubtune.localhub.formats import upload_mode
from hubtune.localhub.request import Request, repo_prefix, split_rev
from hubtune.localhub.store import Op

UPLOAD_TTL_S = 3600
LFS_JSON = "application/vnd.git-lfs+json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UploadNonces:
    """Single use of signed upload URLs: a nonce is claimed while its upload runs and spent once it succeeds.

    A failed upload gives its nonce back, so the client's retry of the same URL works.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._spent: set[str] = set()

    def claim(self, nonce: str) -> bool:
        """Reserve ``nonce``; False if it is spent or in use by a concurrent upload."""
        with self._lock:
            if nonce in self._spent or nonce in self._busy:
                return False
            self._busy.add(nonce)
            return True

    def finish(self, nonce: str, success: bool) -> None:
        """End the upload that claimed ``nonce``."""
        with self._lock:
            self._busy.discard(nonce)
            if success:
                self._spent.add(nonce)


def preupload(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST /api/{t}s/{repo}/preupload/{rev}``: the upload mode of each file, and its current oid."""
    check_repo(req, repo_type, repo_id, write=True)
    tree = commit_at(req, repo_type, repo_id, split_rev(segs)[0])["tree"]
    out = []
    for n, item in enumerate(field(req.json_body("preupload body"), "files", list, "preupload body", [])):
        what = f"preupload files[{n}]"
        item = as_object(item, what)
        path, size = field(item, "path", str, what), field(item, "size", int, what, 0)
        mode = upload_mode(path, size, _base64(field(item, "sample", str, what, ""), f"{what} 'sample'"))
        result = {"path": path, "uploadMode": mode, "shouldIgnore": False}
        current = tree.get(path)
        if current is not None and current["lfs"] == (mode == "lfs"):
            result["oid"] = current["sha256"] if current["lfs"] else current["oid"]
        out.append(result)
    req.json({"files": out})


def commit(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST /api/{t}s/{repo}/commit/{rev}``: apply an NDJSON list of operations, read one line at a time."""
    user = require_writer(req)
    check_repo(req, repo_type, repo_id, write=True)
    rev = split_rev(segs)[0]
    lines = ndjson_objects(req.reader(), req.hub.limits.commit_line, "commit body")
    _, first = next(lines, (1, {}))
    if first.get("key") != "header":
        raise HubError("malformed commit body: the first NDJSON line must be {\"key\": \"header\", \"value\": {...}}")
    header = as_object(first.get("value"), "the commit header's 'value'")
    summary, description = (field(header, key, str, "commit header", "") for key in ("summary", "description"))
    parent = field(header, "parentCommit", str, "commit header", None)
    ops = [_commit_op(req, user, repo_type, repo_id, number, line) for number, line in lines]
    create_pr = req.arg("create_pr") in ("1", "true")
    sha, pr = req.store.commit(repo_type, repo_id, rev, ops, summary, description, user, parent, create_pr)
    repo_url = f"{req.base()}/{repo_prefix(repo_type)}{repo_id}"
    req.json({"commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}", "success": True,
              "pullRequestUrl": f"{repo_url}/discussions/{pr}" if pr else None})


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        raise HubError(f"{what} is not valid base64") from None


def _commit_op(req: Request, user: str, repo_type: str, repo_id: str, number: int, line: dict[str, Any]) -> Op:
    what = f"commit body line {number}"
    key, value = field(line, "key", str, what), as_object(line.get("value"), f"{what} 'value'")
    path = field(value, "path", str, what)
    if key == "file":
        content, encoding = field(value, "content", str, what), field(value, "encoding", str, what, "")
        data = _base64(content, f"{what} 'content'") if encoding == "base64" else content.encode()
        return Op("add", path, req.store.put_bytes(data))
    if key == "lfsFile":
        # Also the form of server-side copies (CommitOperationCopy), which send no size.
        oid, size = field(value, "oid", str, what), field(value, "size", int, what, None)
        # One message for "absent" and "not yours": a different one would tell who stores what.
        if not (req.store.has_object(oid, size) and may_use_object(req.hub, user, repo_type, repo_id, oid)):
            raise HubError(f"LFS object {oid} for {path!r} was not uploaded (or has another size); upload it "
                           "through the LFS batch endpoint before committing")
        return Op("add", path, oid, lfs=True)
    if key in ("deletedFile", "deletedFolder"):
        return Op("delete_file" if key == "deletedFile" else "delete_folder", path)
    raise HubError(f"unsupported commit operation {key[:40]!r} on {what}: use file, lfsFile, deletedFile or "
                   "deletedFolder")


def _signature(req: Request, repo_type: str, repo_id: str, oid: str, size: int, expires: int, nonce: str) -> str:
    # Bound to the repo: an href for one repo cannot be replayed to make another repo hold the object.
    message = f"{repo_type}:{repo_id}:{oid}:{size}:{expires}:{nonce}".encode()
    return hmac.new(req.hub._secret, message, hashlib.sha256).hexdigest()


def lfs_batch(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST {P}{repo}.git/info/lfs/objects/batch``: which objects to upload, with signed upload URLs."""
    user = require_writer(req)
    check_repo(req, repo_type, repo_id, write=True)
    body = req.json_body("LFS batch body")
    if body.get("operation") != "upload":
        raise HubError(f"LFS batch operation {str(body.get('operation'))[:40]!r} is not supported; only 'upload' is")
    repo_url = f"{req.base()}/{repo_prefix(repo_type)}{quote(repo_id)}.git/info/lfs/objects"
    limit, objects = req.hub.limits.upload, []
    for obj in field(body, "objects", list, "LFS batch body", []):
        oid, size = (obj.get("oid"), obj.get("size")) if isinstance(obj, dict) else (None, None)
        if not (isinstance(oid, str) and _SHA256.fullmatch(oid) and type(size) is int and size >= 0):
            objects.append({"oid": str(oid)[:64], "size": size if type(size) is int else 0, "error": {
                "code": 422, "message": "each object needs 'oid', a sha256 hex digest, and 'size', an integer >= 0"}})
        elif size > limit:
            message = f"{size} bytes is over the upload limit of {limit} bytes ({human_size(limit)})"
            objects.append({"oid": oid, "size": size,
                            "error": {"code": 413, "message": message + LIMIT_HINTS["upload"]}})
        elif req.store.has_object(oid, size) and may_use_object(req.hub, user, repo_type, repo_id, oid):
            objects.append({"oid": oid, "size": size})  # no actions: the client skips the upload
        else:
            expires, nonce = int(time.time()) + UPLOAD_TTL_S, uuid.uuid4().hex
            sig = _signature(req, repo_type, repo_id, oid, size, expires, nonce)
            query = f"size={size}&expires={expires}&nonce={nonce}&sig={sig}"
            objects.append({"oid": oid, "size": size, "actions": {
                "upload": {"href": f"{repo_url}/upload/{oid}?{query}", "expires_in": UPLOAD_TTL_S},
                "verify": {"href": f"{repo_url}/verify"}}})
    req.json({"transfer": "basic", "objects": objects}, content_type=LFS_JSON)


def lfs_put(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``PUT`` to a signed upload URL (no auth header): stream the bytes to disk and let this repo hold them.

    The signature is checked before a byte of the body is read, and the body may be no longer than the size the
    URL was signed for (413 otherwise, unread).
    """
    oid = segs[0]
    size, expires = req.int_arg("size", 0), req.int_arg("expires", 0)
    nonce, sig = req.arg("nonce"), req.arg("sig")
    if not hmac.compare_digest(sig, _signature(req, repo_type, repo_id, oid, size, expires, nonce)):
        raise HubError("upload URL signature is invalid; request a new one from the LFS batch endpoint", status=403)
    req.open_body(size, f"the upload of {oid}", ", the size its upload URL was signed for")
    if expires < time.time() or not req.hub.upload_nonces.claim(nonce):
        raise HubError("upload URL expired or already used; request a new one from the LFS batch endpoint",
                       status=403)
    done = False
    try:
        body = req.reader()
        req.store.put_stream(body.read, size, oid)
        body.read_all()  # the end of the body: b"", or 413 for bytes past the signed size
        req.store.add_holder(repo_type, repo_id, [oid])
        done = True
    finally:
        req.hub.upload_nonces.finish(nonce, done)
    req.send(200)


def lfs_verify(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST {P}{repo}.git/info/lfs/objects/verify``: confirm the repo has the object it uploaded."""
    check_repo(req, repo_type, repo_id, write=True)
    body = req.json_body("LFS verify body")
    oid, size = field(body, "oid", str, "LFS verify body"), field(body, "size", int, "LFS verify body", None)
    if not (req.store.has_object(oid, size) and req.store.holds(repo_type, repo_id, oid)):
        raise HubError(f"LFS object {oid} of size {size} is not stored; upload it again", status=404)
    req.json({"message": "verified"})
