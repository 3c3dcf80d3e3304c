"""Errors the local Hub answers to HTTP clients: a status code plus the ``X-Error-Code`` the HF clients map to types.

These never reach a hubtune user as such (the server turns them into responses); hubtune's own user-facing
errors are in :mod:`hubtune.errors`.
"""

from __future__ import annotations

from typing import Any


class HubError(Exception):
    """An error with the HTTP status and ``X-Error-Code`` the server should answer with."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.code = code or self.code
        self.headers = headers or {}
        self.extra = extra or {}


class RepoNotFound(HubError):
    status, code = 404, "RepoNotFound"


class RevisionNotFound(HubError):
    status, code = 404, "RevisionNotFound"


class EntryNotFound(HubError):
    status, code = 404, "EntryNotFound"


class Conflict(HubError):
    status = 409
