"""The route table: which function answers each (method, action) of the Hub API (design/hub-protocol.md)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from hubtune.localhub import admin, downloads, uploads
from hubtune.localhub.errors import HubError
from hubtune.localhub.request import Request

RepoRoute = Callable[[Request, str, str, list[str]], None]

XET_MESSAGE = ("This local Hub has no Xet storage. Set HF_HUB_DISABLE_XET=1 in the client environment "
               "(LocalHub.env() does) so uploads and downloads use plain HTTP and LFS.")

# /api/<path>
API_ROUTES: dict[tuple[str, str], Callable[[Request], None]] = {
    ("GET", "whoami-v2"): admin.whoami,
    ("POST", "validate-yaml"): admin.validate_yaml,
    ("GET", "agent-harnesses"): admin.agent_harnesses,
    ("POST", "repos/create"): admin.create_repo,
}

# /api/{t}s/{ns}/{name}/<action>/...; no action is repo info at the default branch
REPO_ROUTES: dict[tuple[str, str], RepoRoute] = {
    # downloads
    ("GET", "revision"): downloads.info, ("GET", "tree"): downloads.tree, ("GET", "refs"): downloads.refs,
    ("GET", "commits"): downloads.commits, ("POST", "paths-info"): downloads.paths_info,
    # uploads
    ("POST", "preupload"): uploads.preupload, ("POST", "commit"): uploads.commit,
    # repo admin
    ("POST", "branch"): admin.branch, ("DELETE", "branch"): admin.branch,
    ("POST", "tag"): admin.tag, ("DELETE", "tag"): admin.tag, ("PUT", "settings"): admin.settings,
}


def dispatch(req: Request) -> None:
    """Answer ``req`` with the function its method and path route to; HubError 404 when none does."""
    segs = req.path.split("/")[1:]
    if segs[:1] == ["api"]:
        return _dispatch_api(req, "GET" if req.method == "HEAD" else req.method, segs[1:])
    repo_type = "model"
    if segs and segs[0] in ("datasets", "spaces"):
        repo_type, segs = segs[0][:-1], segs[1:]
    if len(segs) >= 4 and segs[2] == "resolve" and req.method in ("GET", "HEAD"):
        return downloads.resolve(req, repo_type, f"{unquote(segs[0])}/{unquote(segs[1])}", segs[3:])
    if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
        repo_id, action = f"{unquote(segs[0])}/{unquote(segs[1])[:-4]}", segs[5:]
        if req.method == "POST" and action == ["batch"]:
            return uploads.lfs_batch(req, repo_type, repo_id)
        if req.method == "POST" and action == ["verify"]:
            return uploads.lfs_verify(req, repo_type, repo_id)
        if req.method == "PUT" and len(action) == 2 and action[0] == "upload":
            return uploads.lfs_put(req, repo_type, repo_id, action[1])
    raise HubError(f"no route for {req.method} {unquote(req.path)} on this local hub", status=404)


def _dispatch_api(req: Request, method: str, segs: list[str]) -> None:
    simple = API_ROUTES.get((method, "/".join(segs)))
    if simple is not None:
        return simple(req)
    if len(segs) >= 3 and segs[0] in ("models", "datasets", "spaces"):
        repo_type, repo_id, rest = segs[0][:-1], f"{unquote(segs[1])}/{unquote(segs[2])}", segs[3:]
        action = rest[0] if rest else "revision"
        if action in ("xet-read-token", "xet-write-token"):
            raise HubError(XET_MESSAGE, status=404)
        route = REPO_ROUTES.get((method, action))
        if route is not None:
            return route(req, repo_type, repo_id, rest[1:])
    raise HubError(f"no route for {req.method} {unquote(req.path)} on this local hub", status=404)
