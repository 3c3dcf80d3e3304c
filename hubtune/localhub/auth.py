"""Who is asking and what they may do: tokens, namespaces, private repos and the use of stored objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hubtune.localhub.errors import HubError, RepoNotFound

if TYPE_CHECKING:
    from hubtune.localhub.request import Request
    from hubtune.localhub.server import LocalHub


def identify(req: Request) -> tuple[str, str] | None:
    """(user, role) of the request's Bearer token, None without one; 401 for an unknown token."""
    auth = req.headers.get("Authorization", "")
    if not auth:
        return None
    token = auth.removeprefix("Bearer ").strip()
    if token not in req.hub.tokens:
        raise HubError("Invalid credentials in Authorization header", status=401)
    return req.hub.tokens[token]


def owns(hub: LocalHub, user: str, namespace: str) -> bool:
    """Whether ``user`` may write to ``namespace`` (their own, or one of their orgs)."""
    return namespace == user or namespace in hub.orgs.get(user, ())


def require_writer(req: Request) -> str:
    """The user of a write token; 401 without a token, 403 for a read-only one."""
    ident = identify(req)
    if ident is None:
        raise HubError("this operation needs a write token: pass token=... or set HF_TOKEN", status=401)
    if ident[1] != "write":
        raise HubError(f"the token of user {ident[0]!r} is read-only; use a write token for this operation",
                       status=403)
    return ident[0]


def can_read(hub: LocalHub, user: str, repo_type: str, repo_id: str) -> bool:
    """Whether ``user`` ("" = anonymous) may read the repo: it is public, or in a namespace the user owns."""
    try:
        repo = hub.store.load_repo(repo_type, repo_id)
    except HubError:
        return False
    return not repo["private"] or bool(user and owns(hub, user, repo_id.split("/")[0]))


def check_repo(req: Request, repo_type: str, repo_id: str, write: bool = False) -> dict[str, Any]:
    """The repo's state if the caller may read it (or write it, with ``write``); private repos look absent."""
    user = require_writer(req) if write else (identify(req) or ("", ""))[0]
    repo = req.store.load_repo(repo_type, repo_id)
    ns = repo_id.split("/")[0]
    if repo["private"] and not (user and owns(req.hub, user, ns)):
        hint = "pass a token with access" if user else "it may be private: pass a token (HF_TOKEN)"
        raise RepoNotFound(f"{repo_type} repo {repo_id!r} not found; {hint}", status=404 if user else 401)
    if write and not owns(req.hub, user, ns):
        raise HubError(f"user {user!r} cannot write to {repo_id!r}: namespace {ns!r} is neither the user nor "
                       f"one of their orgs ({sorted(req.hub.orgs.get(user, ()))})", status=403)
    return repo


def may_use_object(hub: LocalHub, user: str, repo_type: str, repo_id: str, sha256: str) -> bool:
    """Whether ``user`` may put stored object ``sha256`` into the repo without uploading its bytes.

    Yes when the repo holds it already, or a repo the user can read does (they could download it anyway).
    That it exists somewhere else is no proof: it may be another user's private file.
    """
    if hub.store.holds(repo_type, repo_id, sha256):
        return True
    return any(can_read(hub, user, t, r) for t, r in hub.store.holders(sha256))
