"""The HTTP server: a threading server, a thin request handler that hands each request to the route table, and
:class:`LocalHub`, which owns both plus the storage, the tokens and the request log tests read.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple
from urllib.parse import unquote

from hubtune.errors import ConfigError
from hubtune.localhub.body import BodyLimits
from hubtune.localhub.errors import HubError
from hubtune.localhub.request import Request
from hubtune.localhub.routes import dispatch
from hubtune.localhub.store import HubStore
from hubtune.localhub.uploads import UploadNonces

logger = logging.getLogger(__name__)

REQUEST_LOG_SIZE = 5000
LINGER_S = 2.0
SERVING_LOCK = ".serving.lock"


class RequestRecord(NamedTuple):
    """One entry of ``LocalHub.requests``; never headers or query strings (they can hold credentials)."""

    method: str
    path: str
    status: int  # 0: the connection ended without an answer
    range: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog: connections the kernel completes while the accept loop is busy. With the default of 5,
    # a burst of clients overflows it and their SYNs are dropped or reset (retried after 1, 3, 7... s). Linux caps
    # it at net.core.somaxconn (4096 since 5.4). Each accepted connection gets its own thread, so there is no
    # worker pool to size: idle keep-alive connections (the HF clients pool theirs) never starve new ones.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away while its request was read (a reset, a killed process) is nothing to report;
        # anything else is a bug in the server and keeps socketserver's traceback
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("client %s went away: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Cut idle keep-alive connections so no handler thread outlives the server."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubtune-localhub"
    timeout = 120  # a silent client is dropped after this; objects.STALE_UPLOAD_S relies on it
    disable_nagle_algorithm = True  # headers and body go out in separate writes; Nagle would delay each by ~40 ms
    linger = False  # set by Request.start when the answer goes out before the request body was read
    server: _Server

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        req = Request(self, hub, method)
        try:
            try:
                if hub.before_request is not None:
                    hub.before_request(method, unquote(req.path))
                dispatch(req)
            except HubError as err:
                req.error(err)
            except (ConnectionError, TimeoutError):
                raise
            except Exception:
                logger.exception("local hub failed on %s %s", method, req.path)
                req.error(HubError("internal error in the local hub; see the server log", status=500))
        except (ConnectionError, TimeoutError):  # the client went away mid-transfer
            self.close_connection = True
        finally:
            req.record()  # no-op when the answer was sent (it was recorded then)

    def finish(self) -> None:
        super().finish()
        if self.linger:
            _linger(self.connection)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.server.hub.quiet:  # path only: the query can hold an upload signature, headers hold tokens
            logger.info("%s %s %s -> %s", self.address_string(), self.command, self.path.split("?")[0], code)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.hub.quiet:
            logger.info("%s %s", self.address_string(), re.sub(r"\?\S*", "?...", format % args))


def _linger(conn: socket.socket) -> None:
    """Half-close, then discard what the client still sends, for at most LINGER_S.

    Closing a socket with unread input makes the kernel answer with a reset, which can destroy the answer (a 401
    or 413 sent before the body was read) before the client has read it. A client that is still sending its body
    reads the answer once it has sent it, or once the close below cuts it off.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv(1 << 16):
                break
    except OSError:  # the client closed first, or timed out: either way there is nothing left to protect
        pass


class LocalHub:
    """A Hub-compatible server over a storage root, served from a daemon thread; use as a context manager."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 tokens: dict[str, tuple[str, str]] | None = None, quiet: bool = True,
                 orgs: dict[str, list[str]] | None = None, page_size: int = 1000,
                 request_log_size: int = REQUEST_LOG_SIZE, limits: BodyLimits | None = None) -> None:
        """Configure the server; nothing listens until ``start()``.

        Args:
            root: storage directory (created if missing); a restart over the same root serves the same commits.
            host: interface to bind; the loopback address by default.
            port: TCP port; 0 picks a free one.
            tokens: token -> (user name, "read" | "write").
            quiet: when False, log one line per request (never the Authorization header or query string).
            orgs: user name -> org namespaces that user may write to.
            page_size: entries per page of tree and commit listings (the Hub uses 1000).
            request_log_size: how many recent requests ``requests`` keeps.
            limits: the largest request body each kind of endpoint reads (``BodyLimits()`` by default).
        """
        for user, role in (tokens or {}).values():
            if role not in ("read", "write") or not user:
                raise ValueError(f"token role for user {user!r} must be 'read' or 'write', got {role!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.root, self.host, self.port = Path(root), host, port
        self.store = HubStore(root)
        self.tokens = dict(tokens or {})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.quiet, self.page_size = quiet, page_size
        self.limits = limits or BodyLimits()
        self.url = ""
        # The last request_log_size requests, each recorded before its answer is sent. Read a window of it with
        # requests_since(mark), which notices entries that already fell out; a slice of the deque would not.
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_size)
        self.request_count = 0  # requests recorded so far, including those dropped from ``requests``
        self._log_changed = threading.Condition()
        # Tests inject faults here: called with (method, decoded path) before routing; raising ConnectionError
        # drops the connection without an answer, as a server that dies mid-request would.
        self.before_request: Callable[[str, str], None] | None = None
        self.upload_nonces = UploadNonces()
        self._secret = os.urandom(32)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._root_lock: IO[str] | None = None

    # ---- request log ---------------------------------------------------------------------------------------------
    def _record(self, method: str, path: str, status: int, range_header: str | None) -> None:
        with self._log_changed:
            self.requests.append(RequestRecord(method, unquote(path), status, range_header))
            self.request_count += 1
            self._log_changed.notify_all()

    def requests_since(self, mark: int) -> list[RequestRecord]:
        """The requests recorded after ``mark`` (a former ``request_count``), oldest first.

        Raises:
            LookupError: some of them were already dropped from the bounded log.
        """
        with self._log_changed:
            new, kept = self.request_count - mark, len(self.requests)
            if new < 0:
                raise ValueError(f"mark {mark} is ahead of request_count {self.request_count}; "
                                 "take marks from hub.request_count")
            if new > kept:
                raise LookupError(f"{new - kept} of the {new} requests since mark {mark} were dropped from the log, "
                                  f"which keeps the last {self.requests.maxlen}; take the mark closer to them")
            return list(self.requests)[kept - new:]

    def wait_for_request(self, match: Callable[[RequestRecord], bool], since: int,
                         timeout: float = 10) -> RequestRecord:
        """The first request after mark ``since`` that ``match``es, waiting up to ``timeout`` s for it.

        Raises:
            TimeoutError: no such request was recorded in time.
        """
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                found = next((r for r in self.requests_since(since) if match(r)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching request within {timeout} s; since mark {since}: "
                                       f"{self.requests_since(since)}")
                self._log_changed.wait(left)

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> LocalHub:
        """Clean up after a killed server, bind, and serve in a daemon thread; ``url`` is valid afterwards.

        Raises:
            ConfigError: the address cannot be bound (port in use, unknown host, privileged port).
        """
        if self._server is not None:
            return self
        self._claim_root()
        try:
            self._server = _Server((self.host, self.port), self)
        except OSError as err:
            self._release_root()
            where = f"{self.host}:{self.port}"
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot serve on {where}: the port is already in use (another server?); "
                                  "pass --port 0 to pick a free port, or choose another --port") from None
            raise ConfigError(f"cannot serve on {where}: {err.strerror or err}; check --host and --port") from None
        self.port = self._server.server_address[1]
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"localhub-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _claim_root(self) -> None:
        # Every serving LocalHub holds a shared flock on the root. Getting it exclusively first proves that no
        # other server (this process or another) is receiving uploads, so every staged file is a leftover.
        fh = open(self.store.root / SERVING_LOCK, "a")  # noqa: SIM115 - held open while serving, see _release_root
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sole = True
        except BlockingIOError:
            sole = False
        removed = self.store.objects.clean_staging(sole_server=sole)
        if removed:
            logger.info("removed %d partial upload(s) left in %s by a stopped server", len(removed),
                        self.store.objects.staging)
        fcntl.flock(fh, fcntl.LOCK_SH)
        self._root_lock = fh

    def _release_root(self) -> None:
        if self._root_lock is not None:
            self._root_lock.close()  # closing the file drops the flock
            self._root_lock = None

    def stop(self) -> None:
        """Stop serving, cut open connections and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None
        self._release_root()

    def open_connections(self) -> int:
        """How many client connections a handler thread is serving now (keep-alive ones included)."""
        if self._server is None:
            return 0
        with self._server.connections_lock:
            return len(self._server.connections)

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point the HF clients at this server (set them before importing the clients)."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30",
               "NO_PROXY": no_proxy}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def __enter__(self) -> LocalHub:  # noqa: PYI034 (typing.Self needs Python 3.11; 3.10 is supported)
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
