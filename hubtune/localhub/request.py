"""The plumbing every route shares: the parsed request target, reading the body, and answering (JSON or errors).

Route functions get a :class:`Request` and never touch the socket handler directly, so that every response goes
through :meth:`Request.start`, which records the request in the hub's log *before* the status line is sent: a
client that has its answer always finds the entry.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from hubtune.localhub.errors import HubError
from hubtune.localhub.store import DEFAULT_BRANCH

if TYPE_CHECKING:
    from hubtune.localhub.server import LocalHub

_CHUNK = 1 << 20


def split_rev(segs: list[str], default: str = DEFAULT_BRANCH) -> tuple[str, list[str]]:
    """Split a revision (one encoded segment, or literal ``refs/pr/N``-style) off the path segments."""
    if not segs or not segs[0]:
        return default, segs[1:]
    if unquote(segs[0]) == "refs" and len(segs) >= 3 and segs[1] in ("pr", "convert", "heads", "tags"):
        return f"refs/{segs[1]}/{unquote(segs[2])}", segs[3:]
    return unquote(segs[0]), segs[1:]


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
        self.status, self.sent, self.recorded, self.body_done = 0, False, False, False
        self._read: Callable[[int], bytes] | None = None

    def arg(self, name: str, default: str = "") -> str:
        """The first value of query parameter ``name``."""
        return self.query.get(name, [default])[0]

    def base(self) -> str:
        """The server's URL as the client addressed it (URLs we return must use the client's host)."""
        return f"http://{self.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    # ---- body ----------------------------------------------------------------------------------------------------
    def reader(self) -> Callable[[int], bytes]:
        """A ``read(n)`` over the request body (Content-Length or chunked); b"" at its end."""
        if self._read is None:
            self._read = self._make_reader()
        return self._read

    def _make_reader(self) -> Callable[[int], bytes]:
        rfile = self.handler.rfile
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            remaining = int(self.headers.get("Content-Length") or 0)

            def read(n: int) -> bytes:
                nonlocal remaining
                data = rfile.read(min(n, remaining)) if remaining > 0 else b""
                remaining -= len(data)
                self.body_done = remaining <= 0 or not data
                return data

            return read
        buf, done = bytearray(), False

        def read_chunked(n: int) -> bytes:
            nonlocal done
            while len(buf) < n and not done:
                size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    done = self.body_done = True
                else:
                    buf.extend(rfile.read(size))
                    rfile.readline()
            data = bytes(buf[:n])
            del buf[:n]
            return data

        return read_chunked

    def body(self) -> bytes:
        """The whole request body."""
        read, chunks = self.reader(), []
        while chunk := read(_CHUNK):
            chunks.append(chunk)
        self.body_done = True
        return b"".join(chunks)

    def json_body(self) -> Any:
        """The request body parsed as JSON (``{}`` when empty); HubError 400 when malformed."""
        raw = self.body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(f"request body is not valid JSON: {err}") from None

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
        has_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if has_body and not self.body_done:
            handler.close_connection = True  # unread request body: the connection cannot be reused
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
