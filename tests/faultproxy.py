"""A fault-injecting HTTP/1.1 proxy for tests: point a client at ``proxy.url`` instead of the server's URL.

It forwards requests to ``target`` unchanged (keep-alive, chunked or Content-Length bodies streamed through, the
``Host`` header kept so that URLs the server builds point back at the proxy) and relays the answers unchanged
(``X-Repo-Commit``, ``ETag``, ``Content-Range``, ...), except for requests matched by a rule added at run time:

    with FaultProxy(hub.url) as proxy:
        flaky = proxy.fail("POST", r"/commit/", status=503)   # the first matching request gets a 503
        gone = proxy.drop("PUT", r"/upload/")                  # read the request, close without answering
        stuck = proxy.hold("GET", r"/resolve/", timeout=5)     # answer only after stuck.release() (or 5 s)
        seen = proxy.count("*", r"/api/")                      # forward, only count
        ... HfApi(endpoint=proxy.url) ...
        assert flaky.applied == 1 and seen.matched == 3

Rules match the method (or ``*``) and ``re.search`` of the percent-decoded path (no query string); a rule with
``times=N`` acts on the first N matches and lets later ones through, still counting them in ``matched``.
``close()`` ends every thread the proxy started, whatever it was doing, and every socket operation has a timeout.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import IO, Literal
from urllib.parse import unquote, urlsplit

Action = Literal["status", "drop", "hold", "count"]
_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024


@dataclass
class Rule:
    """What to do with requests whose method and path match; its counters are updated as requests arrive."""

    method: str
    path: re.Pattern[str]
    action: Action
    times: int | None = 1  # requests that get the fault; None: every match
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0  # how long "hold" waits for release() before forwarding anyway
    matched: int = 0  # requests that matched, with or without the fault
    applied: int = 0  # requests that got the fault
    released: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)  # set once a request is being held

    def release(self) -> None:
        """Let held requests (and later ones) through."""
        self.released.set()


class _Closed(Exception):
    """A peer closed its connection where a message was expected to continue."""


class FaultProxy:
    """An HTTP/1.1 proxy on a free 127.0.0.1 port that forwards to ``target`` and injects faults by rule."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be an http:// URL, got {target!r}")
        self.target = (parts.hostname, parts.port or 80)
        self.timeout = timeout
        self.rules: list[Rule] = []
        self.errors: list[BaseException] = []  # unexpected errors in proxy threads, for debugging a test
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # the accept loop checks for close() this often
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._spawn(self._accept_loop, "accept")

    # ---- rules ---------------------------------------------------------------------------------------------------
    def add_rule(self, method: str, path: str, action: Action, **options: object) -> Rule:
        """Add a rule (see :class:`Rule` for ``options``) and return it."""
        rule = Rule(method.upper(), re.compile(path), action, **options)  # type: ignore[arg-type]
        if self._closing.is_set():
            rule.release()
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, method: str, path: str, status: int = 503, times: int | None = 1,
             headers: dict[str, str] | None = None) -> Rule:
        """Answer ``status`` with an empty JSON body to the first ``times`` matching requests."""
        return self.add_rule(method, path, "status", status=status, times=times, headers=headers or {})

    def drop(self, method: str, path: str, times: int | None = 1) -> Rule:
        """Read the first ``times`` matching requests, then close their connection without an answer."""
        return self.add_rule(method, path, "drop", times=times)

    def hold(self, method: str, path: str, timeout: float = 30.0, times: int | None = 1,
             release: threading.Event | None = None) -> Rule:
        """Keep matching requests waiting until ``release`` is set or ``timeout`` s have passed, then forward them.

        ``rule.release()`` sets it, and so does ``close()``, so that no thread stays held.
        """
        options = {"released": release} if release is not None else {}
        return self.add_rule(method, path, "hold", timeout=timeout, times=times, **options)

    def count(self, method: str, path: str) -> Rule:
        """Forward matching requests, only counting them in ``rule.matched``."""
        return self.add_rule(method, path, "count", times=None)

    def _match(self, method: str, path: str) -> Rule | None:
        chosen = None
        with self._lock:
            for rule in self.rules:
                if rule.method in ("*", method) and rule.path.search(path):
                    rule.matched += 1
                    if chosen is None and rule.action != "count" and (rule.times is None or rule.applied < rule.times):
                        rule.applied += 1
                        chosen = rule
        return chosen

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), name=f"faultproxy-{name}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as err:  # noqa: BLE001 - a proxy thread must end quietly; the test reads `errors`
            if not self._closing.is_set():
                self.errors.append(err)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(self.timeout)
        with self._lock:
            self._sockets.add(sock)
        if self._closing.is_set():  # close() took its list of sockets before this one was added
            _shutdown(sock)
        return sock

    def _forget(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)
        _shutdown(sock)  # now: close() alone waits until the makefile() readers are gone too
        sock.close()

    def close(self) -> None:
        """Stop accepting, cut every connection, release held requests and wait for every thread to end.

        Raises:
            RuntimeError: a thread did not end (a bug in the proxy).
        """
        self._closing.set()
        with self._lock:
            rules, sockets = list(self.rules), list(self._sockets)
        for rule in rules:
            rule.release()
        for sock in sockets:  # wakes threads blocked in recv/send
            _shutdown(sock)
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            threads[0].join(timeout=self.timeout)
            if threads[0].is_alive():
                raise RuntimeError(f"fault proxy thread {threads[0].name} did not end within {self.timeout} s")
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- connections ---------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._track(client)
            self._spawn(self._serve_client, "conn", client)

    def _serve_client(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            reader = client.makefile("rb")
            up_reader: IO[bytes] | None = None
            while not self._closing.is_set():
                head = _read_head(reader, allow_eof=True)
                if head is None:
                    return
                method, target = head[0].split(b" ", 2)[:2]
                path = unquote(target.decode("latin-1").split("?", 1)[0])
                rule = self._match(method.decode("latin-1").upper(), path)
                if rule is not None and rule.action == "drop":
                    _relay_body(reader, None, head, request=True)
                    return
                if rule is not None and rule.action == "status":
                    _relay_body(reader, None, head, request=True)
                    _send_status(client, rule, head_only=method == b"HEAD")
                    if _wants_close(head):
                        return
                    continue
                if rule is not None and rule.action == "hold":
                    rule.holding.set()
                    rule.released.wait(rule.timeout)
                    if self._closing.is_set():
                        return
                if upstream is None:
                    upstream = self._track(socket.create_connection(self.target, timeout=self.timeout))
                    up_reader = upstream.makefile("rb")
                assert up_reader is not None
                upstream.sendall(b"".join(head) + b"\r\n")
                _relay_body(reader, upstream, head, request=True)
                reply = _read_head(up_reader)
                while reply[0].split(b" ", 2)[1].startswith(b"1") and reply[0].split(b" ", 2)[1] != b"101":
                    client.sendall(b"".join(reply) + b"\r\n")  # 100 Continue: the final answer follows
                    reply = _read_head(up_reader)
                client.sendall(b"".join(reply) + b"\r\n")
                until_eof = _relay_body(up_reader, client, reply, request=False, head_request=method == b"HEAD")
                if until_eof or _wants_close(reply):
                    self._forget(upstream)
                    upstream = up_reader = None
                if until_eof or _wants_close(head):
                    return
        except (OSError, _Closed):
            return  # a peer went away or close() cut the connection: nothing left to relay
        finally:
            self._forget(upstream)
            self._forget(client)


def _read_head(reader: IO[bytes], allow_eof: bool = False) -> list[bytes] | None:
    """The start line and header lines of one message, each with its line ending; None at a clean EOF."""
    lines: list[bytes] = []
    while True:
        line = reader.readline(_MAX_LINE)
        if not line:
            if allow_eof and not lines:
                return None
            raise _Closed("connection closed inside a message head")
        if line in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue  # tolerate blank lines between messages
        lines.append(line)


def _header(head: list[bytes], name: bytes) -> bytes | None:
    for line in head[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _wants_close(head: list[bytes]) -> bool:
    return (_header(head, b"connection") or b"").lower() == b"close"


def _relay_body(src: IO[bytes], dst: socket.socket | None, head: list[bytes], request: bool,
                head_request: bool = False) -> bool:
    """Copy the body that follows ``head`` from ``src`` to ``dst`` (None: discard); True if it ends at EOF."""
    if not request:
        status = head[0].split(b" ", 2)[1]
        if head_request or status.startswith(b"1") or status in (b"204", b"304"):
            return False
    if b"chunked" in (_header(head, b"transfer-encoding") or b"").lower():
        while True:
            line = src.readline(_MAX_LINE)
            if not line:
                raise _Closed("connection closed inside a chunked body")
            _send(dst, line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := src.readline(_MAX_LINE)) not in (b"\r\n", b"\n"):
                    if not trailer:
                        raise _Closed("connection closed inside chunked trailers")
                    _send(dst, trailer)
                _send(dst, trailer)
                return False
            _relay_exact(src, dst, size + 2)  # the chunk and its CRLF
    length = _header(head, b"content-length")
    if length is not None:
        _relay_exact(src, dst, int(length))
        return False
    if request:
        return False  # a request without either header has no body
    while chunk := src.read1(_CHUNK):  # type: ignore[attr-defined]
        _send(dst, chunk)
    return True


def _relay_exact(src: IO[bytes], dst: socket.socket | None, n: int) -> None:
    while n > 0:
        chunk = src.read1(min(_CHUNK, n))  # type: ignore[attr-defined]
        if not chunk:
            raise _Closed(f"connection closed with {n} body bytes missing")
        _send(dst, chunk)
        n -= len(chunk)


def _send(dst: socket.socket | None, data: bytes) -> None:
    if dst is not None:
        dst.sendall(data)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more)
        pass


def _send_status(client: socket.socket, rule: Rule, head_only: bool) -> None:
    try:
        reason = HTTPStatus(rule.status).phrase
    except ValueError:
        reason = "Injected"
    headers = {"Content-Type": "application/json", "Content-Length": "2", "X-Fault-Injected": "faultproxy",
               **rule.headers}
    head = f"HTTP/1.1 {rule.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    client.sendall(head.encode("latin-1") + (b"" if head_only else b"{}"))
