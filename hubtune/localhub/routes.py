"""The route table: which function answers each (method, action) of the Hub API (design/hub-protocol.md), and what
each may read: the :class:`~hubtune.localhub.body.BodyLimits` field that bounds its body, and whether it needs a
write token, which is checked before a byte of the body is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote

from hubtune.localhub import admin, downloads, uploads
from hubtune.localhub.auth import identify, require_writer
from hubtune.localhub.body import LIMIT_HINTS, declared_length
from hubtune.localhub.errors import HubError
from hubtune.localhub.request import Request

XET_MESSAGE = ("This local Hub has no Xet storage. Set HF_HUB_DISABLE_XET=1 in the client environment "
               "(LocalHub.env() does) so uploads and downloads use plain HTTP and LFS.")


class Route(NamedTuple):
    """A route function and what it may read before it runs."""

    handler: Callable[..., None]
    body: str | None = None
    """The BodyLimits field bounding its body; None: it reads none."""
    write: bool = False
    """It needs a write token: 401/403 before the body is read."""


# /api/<path>
API_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "whoami-v2"): Route(admin.whoami),
    ("POST", "validate-yaml"): Route(admin.validate_yaml, body="listing"),  # the client sends no token here
    ("GET", "agent-harnesses"): Route(admin.agent_harnesses),
    ("POST", "repos/create"): Route(admin.create_repo, body="form", write=True),
}

# /api/{t}s/{ns}/{name}/<action>/...; no action is repo info at the default branch
REPO_ROUTES: dict[tuple[str, str], Route] = {
    # downloads
    ("GET", "revision"): Route(downloads.info), ("GET", "tree"): Route(downloads.tree),
    ("GET", "refs"): Route(downloads.refs), ("GET", "commits"): Route(downloads.commits),
    ("POST", "paths-info"): Route(downloads.paths_info, body="listing"),  # anonymous on public repos
    # uploads
    ("POST", "preupload"): Route(uploads.preupload, body="listing", write=True),
    ("POST", "commit"): Route(uploads.commit, body="commit", write=True),
    # repo admin
    ("POST", "branch"): Route(admin.branch, body="form", write=True),
    ("DELETE", "branch"): Route(admin.branch, write=True),
    ("POST", "tag"): Route(admin.tag, body="form", write=True),
    ("DELETE", "tag"): Route(admin.tag, write=True),
    ("PUT", "settings"): Route(admin.settings, body="form", write=True),
}

# {P}{ns}/{name}.git/info/lfs/objects/<action>/...
LFS_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "batch"): Route(uploads.lfs_batch, body="listing", write=True),
    ("POST", "verify"): Route(uploads.lfs_verify, body="form", write=True),
    # No token: the URL's signature is the credential, checked by the handler before it reads the body.
    ("PUT", "upload"): Route(uploads.lfs_put, body="upload"),
}

RESOLVE = Route(downloads.resolve)


def dispatch(req: Request) -> None:
    """Answer ``req`` with the function its method and path route to; HubError 404 when none does.

    Before the route function runs: 400 for a malformed Content-Length or Transfer-Encoding (on any route: the
    connection's framing is lost), 401/403 for a route that needs a write token, 413 for a body over its limit.
    """
    declared_length(req.headers)
    route, args = _find(req)
    if route.write:
        require_writer(req)
    elif route.body is not None:
        identify(req)  # an unknown token is refused before its body is read, too
    if route.body is not None:
        what = f"the body of {req.method} {route.handler.__name__.replace('_', '-')}"
        req.open_body(getattr(req.hub.limits, route.body), what, LIMIT_HINTS.get(route.body, ""))
    route.handler(req, *args)


def _find(req: Request) -> tuple[Route, tuple[Any, ...]]:
    segs = req.path.split("/")[1:]
    if segs[:1] == ["api"]:
        return _find_api(req, "GET" if req.method == "HEAD" else req.method, segs[1:])
    repo_type = "model"
    if segs and segs[0] in ("datasets", "spaces"):
        repo_type, segs = segs[0][:-1], segs[1:]
    if len(segs) >= 4 and segs[2] == "resolve" and req.method in ("GET", "HEAD"):
        return RESOLVE, (repo_type, f"{unquote(segs[0])}/{unquote(segs[1])}", segs[3:])
    if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
        repo_id, action = f"{unquote(segs[0])}/{unquote(segs[1])[:-4]}", segs[5:]
        route = LFS_ROUTES.get((req.method, action[0]))
        if route is not None and len(action) == (2 if action[0] == "upload" else 1):
            return route, (repo_type, repo_id, action[1:])
    raise HubError(f"no route for {req.method} {unquote(req.path)} on this local hub", status=404)


def _find_api(req: Request, method: str, segs: list[str]) -> tuple[Route, tuple[Any, ...]]:
    simple = API_ROUTES.get((method, "/".join(segs)))
    if simple is not None:
        return simple, ()
    if len(segs) >= 3 and segs[0] in ("models", "datasets", "spaces"):
        repo_type, repo_id, rest = segs[0][:-1], f"{unquote(segs[1])}/{unquote(segs[2])}", segs[3:]
        action = rest[0] if rest else "revision"
        if action in ("xet-read-token", "xet-write-token"):
            raise HubError(XET_MESSAGE, status=404)
        route = REPO_ROUTES.get((method, action))
        if route is not None:
            return route, (repo_type, repo_id, rest[1:])
    raise HubError(f"no route for {req.method} {unquote(req.path)} on this local hub", status=404)
