"""Upload-side routes: preupload, commit, and the git-LFS batch / upload / verify endpoints.

A commit may name an LFS object by its sha256 only if the repo may use it (``auth.may_use_object``); otherwise the
client must upload the bytes, through an upload URL signed for this repo. The same answer is given whether or not
the object exists elsewhere, so neither endpoint tells a writer what other repos contain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote

from hubtune.localhub.auth import check_repo, may_use_object, require_writer
from hubtune.localhub.downloads import commit_at
from hubtune.localhub.errors import HubError
from hubtune.localhub.formats import upload_mode
from hubtune.localhub.request import Request, repo_prefix, split_rev
from hubtune.localhub.store import Op

UPLOAD_TTL_S = 3600
LFS_JSON = "application/vnd.git-lfs+json"


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
    for item in req.json_body().get("files", []):
        path, size = item["path"], int(item.get("size", 0))
        mode = upload_mode(path, size, base64.b64decode(item.get("sample", "") or ""))
        result = {"path": path, "uploadMode": mode, "shouldIgnore": False}
        current = tree.get(path)
        if current is not None and current["lfs"] == (mode == "lfs"):
            result["oid"] = current["sha256"] if current["lfs"] else current["oid"]
        out.append(result)
    req.json({"files": out})


def commit(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST /api/{t}s/{repo}/commit/{rev}``: apply an NDJSON list of operations."""
    user = require_writer(req)
    check_repo(req, repo_type, repo_id, write=True)
    try:
        lines = [json.loads(line) for line in req.body().splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
        ops = [_commit_op(req, user, repo_type, repo_id, line["key"], line["value"]) for line in lines[1:]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HubError(f"malformed commit body ({err!r}): expected NDJSON with a header line first") from None
    if header is None:
        raise HubError("malformed commit body: the first NDJSON line must be {'key': 'header', ...}")
    create_pr = req.arg("create_pr") in ("1", "true")
    sha, pr = req.store.commit(repo_type, repo_id, split_rev(segs)[0], ops, header.get("summary") or "",
                               header.get("description") or "", user, header.get("parentCommit"), create_pr)
    repo_url = f"{req.base()}/{repo_prefix(repo_type)}{repo_id}"
    req.json({"commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}", "success": True,
              "pullRequestUrl": f"{repo_url}/discussions/{pr}" if pr else None})


def _commit_op(req: Request, user: str, repo_type: str, repo_id: str, key: str, value: dict[str, Any]) -> Op:
    path = value["path"]
    if key == "file":
        content = value["content"]
        data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
        return Op("add", path, req.store.put_bytes(data))
    if key == "lfsFile":
        # Also the form of server-side copies (CommitOperationCopy), which send no size.
        oid, size = value["oid"], value.get("size")
        # One message for "absent" and "not yours": a different one would tell who stores what.
        if not (req.store.has_object(oid, size) and may_use_object(req.hub, user, repo_type, repo_id, oid)):
            raise HubError(f"LFS object {oid} for {path!r} was not uploaded (or has another size); upload it "
                           "through the LFS batch endpoint before committing")
        return Op("add", path, oid, lfs=True)
    if key in ("deletedFile", "deletedFolder"):
        return Op("delete_file" if key == "deletedFile" else "delete_folder", path)
    raise HubError(f"unsupported commit operation {key!r}: use file, lfsFile, deletedFile or deletedFolder")


def _signature(req: Request, repo_type: str, repo_id: str, oid: str, size: int, expires: int, nonce: str) -> str:
    # Bound to the repo: an href for one repo cannot be replayed to make another repo hold the object.
    message = f"{repo_type}:{repo_id}:{oid}:{size}:{expires}:{nonce}".encode()
    return hmac.new(req.hub._secret, message, hashlib.sha256).hexdigest()


def lfs_batch(req: Request, repo_type: str, repo_id: str) -> None:
    """``POST {P}{repo}.git/info/lfs/objects/batch``: which objects to upload, with signed upload URLs."""
    user = require_writer(req)
    check_repo(req, repo_type, repo_id, write=True)
    body = req.json_body()
    if body.get("operation") != "upload":
        raise HubError(f"LFS batch operation {body.get('operation')!r} is not supported; only 'upload' is")
    repo_url = f"{req.base()}/{repo_prefix(repo_type)}{quote(repo_id)}.git/info/lfs/objects"
    objects = []
    for obj in body.get("objects", []):
        oid, size = obj.get("oid"), obj.get("size")
        if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
            objects.append({"oid": str(oid), "size": int(size or 0),
                            "error": {"code": 422, "message": "oid must be a sha256 hex digest, size an int"}})
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


def lfs_put(req: Request, repo_type: str, repo_id: str, oid: str) -> None:
    """``PUT`` to a signed upload URL (no auth header): store the bytes and let this repo hold them."""
    size, expires, nonce = int(req.arg("size", "-1")), int(req.arg("expires", "0")), req.arg("nonce")
    if not hmac.compare_digest(req.arg("sig"), _signature(req, repo_type, repo_id, oid, size, expires, nonce)):
        raise HubError("upload URL signature is invalid; request a new one from the LFS batch endpoint", status=403)
    if expires < time.time() or not req.hub.upload_nonces.claim(nonce):
        raise HubError("upload URL expired or already used; request a new one from the LFS batch endpoint",
                       status=403)
    done = False
    try:
        req.store.put_stream(req.reader(), size, oid)
        req.store.add_holder(repo_type, repo_id, [oid])
        req.body()  # drain anything past the declared size
        done = True
    finally:
        req.hub.upload_nonces.finish(nonce, done)
    req.send(200)


def lfs_verify(req: Request, repo_type: str, repo_id: str) -> None:
    """``POST {P}{repo}.git/info/lfs/objects/verify``: confirm the repo has the object it uploaded."""
    check_repo(req, repo_type, repo_id, write=True)
    body = req.json_body()
    oid, size = str(body.get("oid")), body.get("size")
    if not (req.store.has_object(oid, size) and req.store.holds(repo_type, repo_id, oid)):
        raise HubError(f"LFS object {oid} of size {size} is not stored; upload it again", status=404)
    req.json({"message": "verified"})
