"""The plumbing every route shares: the parsed request target, reading the body, and answering (JSON or errors).

Route functions get a :class:`Request` and never touch the socket handler directly, so that every response goes
through :meth:`Request.start`, which records the request in the hub's log *before* the status line is sent: a
client that has its answer always finds the entry.
"""

from __future__ import annotations

import json
import re
import uuid
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from hubtune.localhub.body import BodyReader, as_object, declared_length, parse_json
from hubtune.localhub.errors import HubError
from hubtune.localhub.refnames import check_revision
from hubtune.localhub.store import DEFAULT_BRANCH

if TYPE_CHECKING:
    from hubtune.localhub.server import LocalHub


def split_rev(segs: list[str], default: str = DEFAULT_BRANCH) -> tuple[str, list[str]]:
    """Split a revision (one encoded segment, or literal ``refs/pr/N``-style) off the path segments.

    Raises:
        HubError: 400 for a revision git could not name (see ``refnames.check_revision``).
    """
    if not segs or not segs[0]:
        return default, segs[1:]
    if unquote(segs[0]) == "refs" and len(segs) >= 3 and segs[1] in ("pr", "convert", "heads", "tags"):
        return check_revision(f"refs/{segs[1]}/{unquote(segs[2])}"), segs[3:]
    return check_revision(unquote(segs[0])), segs[1:]


def repo_prefix(repo_type: str) -> str:
    """The web-route prefix of a repo type: "" for models, ``datasets/`` and ``spaces/`` for the others."""
    return "" if repo_type == "model" else f"{repo_type}s/"


class Request:
    """One HTTP request as the route functions see it: target, query, body, and the ways to answer it."""

    def __init__(self, handler: BaseHTTPRequestHandler, hub: LocalHub, method: str) -> None:
        self.handler, self.hub, self.store, self.method = handler, hub, hub.store, method
        self.headers = handler.headers
        self.path, _, query = handler.path.partition("?")
        self.query = parse_qs(query, keep_blank_values=True)
        self.rid = self.headers.get("X-Request-Id") or self.headers.get("X-Amzn-Trace-Id") or uuid.uuid4().hex
        self.status, self.sent, self.recorded = 0, False, False
        self._body: BodyReader | None = None

    def arg(self, name: str, default: str = "") -> str:
        """The first value of query parameter ``name``."""
        return self.query.get(name, [default])[0]

    def base(self) -> str:
        """The server's URL as the client addressed it (URLs we return must use the client's host)."""
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    def int_arg(self, name: str, default: int) -> int:
        """Query parameter ``name`` as a non-negative integer; HubError 400 when it is not one."""
        value = self.arg(name, "") or str(default)
        if not value.isdigit() or not value.isascii():
            raise HubError(f"query parameter {name!r} must be a non-negative integer, got {value[:40]!r}")
        return int(value)

    # ---- body ----------------------------------------------------------------------------------------------------
    def open_body(self, limit: int, what: str = "request body", hint: str = "") -> None:
        """Allow reading a body of up to ``limit`` bytes; HubError 400 for bad framing, 413 when it declares more.

        ``routes.dispatch`` calls this, after checking the token, for routes that declare a body limit; a route may
        narrow the limit again before reading, as the LFS upload does to the size its URL was signed for.
        """
        if self._body is not None and self._body.received:
            raise RuntimeError("open_body after part of the body was read")
        self._body = BodyReader(self.handler.rfile, declared_length(self.headers), limit, what, hint)

    def reader(self) -> BodyReader:
        """The body, read in chunks (Content-Length or chunked), bounded by the limit ``open_body`` set."""
        if self._body is None:  # a route that reads a body must declare its limit in routes.py
            raise RuntimeError(f"{self.method} {self.path} reads a body but its route declares no size limit")
        return self._body

    def body(self) -> bytes:
        """The whole (small, bounded) request body."""
        return self.reader().read_all()

    def json_body(self, what: str = "request body") -> dict[str, Any]:
        """The request body as a JSON object (``{}`` when empty); HubError 400 when it is not one."""
        raw = self.body()
        return as_object(parse_json(raw, what), what) if raw.strip() else {}

    def body_unread(self) -> bool:
        """Whether body bytes the client sent (or announced) were left unread, so the connection cannot be reused."""
        if self._body is not None:
            return not self._body.done
        return self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers

    # ---- answering -----------------------------------------------------------------------------------------------
    def record(self) -> None:
        """Log this request in the hub once, with the status decided so far (0: no answer was sent)."""
        if not self.recorded:
            self.recorded = True
            self.hub._record(self.method, self.path, self.status, self.headers.get("Range"))

    def start(self, status: int, headers: dict[str, str]) -> None:
        """Send the status line and headers; the request is logged first (see the module docstring)."""
        self.status, self.sent = status, True
        self.record()
        handler = self.handler
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("X-Request-Id", self.rid)
        if self.body_unread():  # the next request would start somewhere in this body: close after answering
            handler.close_connection = True
            handler.linger = True  # type: ignore[attr-defined]  # server._Handler.finish drains before closing
            handler.send_header("Connection", "close")
        handler.end_headers()

    def write(self, data: bytes) -> None:
        """Write response body bytes (nothing for HEAD)."""
        if self.method != "HEAD":
            self.handler.wfile.write(data)

    def send(self, status: int, body: bytes = b"", content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        """A complete response with ``body``."""
        self.start(status, {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})})
        self.write(body)

    def json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None,
             content_type: str = "application/json") -> None:
        """A JSON response."""
        self.send(status, json.dumps(obj).encode(), content_type, headers)

    def error(self, err: HubError) -> None:
        """Answer ``err`` with its status, ``X-Error-Code``/``X-Error-Message`` and a JSON body."""
        if self.sent:  # too late for a status: cutting the connection is the only signal left
            self.handler.close_connection = True
            return
        message = re.sub(r"[\r\n]+", " ", err.message).encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.json({"error": err.message, **err.extra}, err.status, headers)
