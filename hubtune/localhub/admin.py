"""Repo administration and account routes: create repo, settings, branches, tags, whoami, validate-yaml."""

from __future__ import annotations

from urllib.parse import unquote

import yaml

from hubtune.localhub.auth import check_repo, identify, owns, require_writer
from hubtune.localhub.body import field
from hubtune.localhub.errors import HubError
from hubtune.localhub.formats import CARD_RE
from hubtune.localhub.refnames import check_revision
from hubtune.localhub.request import Request, repo_prefix, split_rev
from hubtune.localhub.store import DEFAULT_BRANCH


def whoami(req: Request) -> None:
    """``GET /api/whoami-v2``: the token's user, orgs and role."""
    ident = identify(req)
    if ident is None:
        raise HubError("Invalid user token: no Authorization header was sent", status=401)
    user, role = ident
    req.json({"type": "user", "name": user, "fullname": user, "email": None,
              "orgs": [{"type": "org", "name": o} for o in sorted(req.hub.orgs.get(user, ()))],
              "auth": {"type": "access_token", "accessToken": {"displayName": f"{user}-{role}", "role": role}}})


def agent_harnesses(req: Request) -> None:
    """``GET /api/agent-harnesses``: the empty list the client's user-agent builder accepts."""
    req.json({"standardEnvVars": [], "harnesses": {}})


def create_repo(req: Request) -> None:
    """``POST /api/repos/create``; 409 with ``url`` when it exists (the client reads it under exist_ok)."""
    what = "repos/create body"
    user, body = require_writer(req), req.json_body(what)
    name, repo_type = field(body, "name", str, what), field(body, "type", str, what, "model")
    ns = field(body, "organization", str, what, user)
    if not owns(req.hub, user, ns):
        raise HubError(f"user {user!r} cannot create repos in namespace {ns!r}: it is neither the user nor one "
                       f"of their orgs ({sorted(req.hub.orgs.get(user, ()))})", status=403)
    repo_id = f"{ns}/{name}"
    private = field(body, "private", bool, what, None)
    if private is None:
        private = field(body, "visibility", str, what, "public") == "private"
    url = f"{req.base()}/{repo_prefix(repo_type)}{repo_id}"
    if not req.store.create_repo(repo_type, repo_id, private, user):
        raise HubError(f"You already created this {repo_type} repo: {repo_id}", status=409, extra={"url": url})
    req.json({"url": url, "name": repo_id, "id": repo_id})


def settings(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``PUT /api/{t}s/{repo}/settings``: change visibility (gating is not supported)."""
    check_repo(req, repo_type, repo_id, write=True)
    body = req.json_body("settings body")
    if body.get("gated") not in (None, False):
        raise HubError("gated repos are not supported by the local hub; leave `gated` unset or False")
    private = body.get("private") if body.get("private") is not None else body.get("visibility")
    if private is not None:
        req.store.set_private(repo_type, repo_id, private in (True, "private"))
    req.json({})


def branch(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST|DELETE /api/{t}s/{repo}/branch/{name}``; a starting point must be a revision of this repo."""
    check_repo(req, repo_type, repo_id, write=True)
    name = "/".join(unquote(s) for s in segs)
    start = None
    if req.method == "POST":
        start = field(req.json_body("branch body"), "startingPoint", str, "branch body", DEFAULT_BRANCH)
        check_revision(start)
    req.store.set_ref(repo_type, repo_id, "branches", name, start)
    req.json({})


def tag(req: Request, repo_type: str, repo_id: str, segs: list[str]) -> None:
    """``POST /api/{t}s/{repo}/tag/{rev}`` with ``{"tag": ...}``, or ``DELETE .../tag/{name}``."""
    check_repo(req, repo_type, repo_id, write=True)
    if req.method == "DELETE":
        req.store.set_ref(repo_type, repo_id, "tags", "/".join(unquote(s) for s in segs), None)
    else:
        name = field(req.json_body("tag body"), "tag", str, "tag body")
        req.store.set_ref(repo_type, repo_id, "tags", name, split_rev(segs)[0])
    req.json({})


def validate_yaml(req: Request) -> None:
    """``POST /api/validate-yaml``: always JSON, 400 with ``errors`` for bad README metadata."""
    content = field(req.json_body("validate-yaml body"), "content", str, "validate-yaml body", "")
    match = CARD_RE.search(content)
    try:
        data = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError as err:
        problem = f"Invalid YAML in README.md metadata: {err}"
    else:
        if data is None or isinstance(data, dict):
            return req.json({"errors": [], "warnings": []})
        problem = f"README.md metadata must be a YAML mapping (key: value lines), got a {type(data).__name__}"
    req.json({"errors": [{"message": problem}], "warnings": []}, status=400)
