"""How hubtune calls the Hub: a timeout on every request, bounded retries of transient failures with backoff.

huggingface_hub's shared HTTP client has no timeout of its own for API calls (a server that holds a commit
request would hang the caller forever); `install_timeouts` gives it one, through the client factory the library
provides for such settings. `retrying` retries what a rerun could fix (connection errors, timeouts, 408, 429, 5xx)
and nothing else: a 401/403/404 is an answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
from huggingface_hub import constants, set_client_factory
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

logger = logging.getLogger("hubtune")

TIMEOUT_ENV = "HUBTUNE_HUB_TIMEOUT"
RETRY_WAIT_ENV = "HUBTUNE_HUB_RETRY_WAIT"
RETRIES_ENV = "HUBTUNE_HUB_RETRIES"
PUSH_TIMEOUT_ENV = "HUBTUNE_PUSH_TIMEOUT"
DEFAULT_PUSH_TIMEOUT_S = 120.0  # a push stops retrying once this much time has passed since it started
DEFAULT_TIMEOUT_S = 300.0  # between two bytes of an answer; large commits on the Hub take a while to answer
CONNECT_TIMEOUT_S = 10.0
# the transport errors huggingface_hub's own backoff retries on, plus the OS-level ones under them
TRANSIENT: tuple[type[BaseException], ...] = (httpx2.TransportError, ConnectionError, TimeoutError)
_installed = threading.Lock()
_done = False


def timeout_s() -> float:
    """Seconds a Hub request may wait for the server (HUBTUNE_HUB_TIMEOUT, default 300)."""
    return _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, "a positive number of seconds", positive=True)


def push_timeout_s() -> float:
    """Seconds after which a push (or checkpoint upload) makes no further attempt (HUBTUNE_PUSH_TIMEOUT, default
    120); an attempt already running ends within its request timeout."""
    return _env_number(PUSH_TIMEOUT_ENV, DEFAULT_PUSH_TIMEOUT_S, float, "a positive number of seconds", positive=True)


def retry_wait_s(default: float = 2.0) -> float:
    """Seconds before the first retry of a failed checkpoint upload or download (HUBTUNE_HUB_RETRY_WAIT); each next
    one waits twice as long."""
    return _env_number(RETRY_WAIT_ENV, default, float, "a number of seconds (0 or more)")


def retries_n(default: int = 4) -> int:
    """How many times a failed checkpoint upload or download is retried (HUBTUNE_HUB_RETRIES), on top of the
    retries huggingface_hub makes of each file transfer."""
    return _env_number(RETRIES_ENV, default, int, "a whole number (0 or more)")


def _env_number(name: str, default: Any, kind: Callable[[str], Any], expected: str, positive: bool = False) -> Any:
    """The number in environment variable `name` (`default` when unset); ConfigError when it is not one, or is
    negative (zero too with `positive`)."""
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw else default
    except ValueError:
        value = -1
    if not (value > 0 if positive else value >= 0):
        from hubtune.errors import ConfigError

        raise ConfigError(f"{name}={raw!r}: expected {expected}")
    return value


def install_timeouts(strict: bool = True) -> None:
    """Give huggingface_hub's shared HTTP client a connect and a read/write timeout (once per process).

    `import hubtune` installs them (not strict: a bad HUBTUNE_HUB_TIMEOUT then means the default until `hub.api()`
    reports it), so every Hub call in a process that imported hubtune has them, whichever call comes first.
    """
    global _done
    with _installed:
        if _done:
            return
        try:
            seconds = timeout_s()
            _done = True
        except ValueError:  # ConfigError
            if strict:
                raise
            seconds = DEFAULT_TIMEOUT_S

        bounds = {"connect": min(CONNECT_TIMEOUT_S, seconds), "read": seconds, "write": seconds, "pool": seconds}

        def bounded(request: httpx2.Request) -> None:
            # HfApi's info calls pass `timeout=None` explicitly, which in httpx means "wait forever" and overrides
            # the client's default: every request leaves with a bound, whatever its caller said
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else v
                                             for k, v in bounds.items()}

        def client() -> httpx2.Client:
            session = _http.default_client_factory()  # keeps the library's request hooks (headers, offline mode)
            session.timeout = httpx2.Timeout(seconds, connect=bounds["connect"])
            session.event_hooks["request"] = [*session.event_hooks["request"], bounded]
            return session

        set_client_factory(client)
        # file metadata and downloads pass their own per-request timeouts (10 s by default), read at call time
        for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
            setattr(constants, name, min(getattr(constants, name), seconds))
        # when that first look fails and nothing is cached, hf_hub_download looks again with retries and a 60 s
        # timeout of its own (a private constant, read at call time): bounded by ours too
        from huggingface_hub import file_download

        if isinstance(getattr(file_download, "_ETAG_RETRY_TIMEOUT", None), (int, float)):
            retry_timeout = min(file_download._ETAG_RETRY_TIMEOUT, seconds)
            # (typed int after its literal, 60; it is a number of seconds, and a float works as well)
            file_download._ETAG_RETRY_TIMEOUT = retry_timeout  # type: ignore[assignment]


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and what it was raised from (huggingface_hub wraps failed LFS uploads in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def status_of(err: BaseException) -> int | None:
    """The HTTP status behind `err`, if the server answered."""
    for cause in causes(err):
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            return response.status_code
    return None


def transient_reason(err: BaseException) -> str | None:
    """Why `err` is worth another attempt (a dropped connection, a timeout, 408/429/5xx), or None when it is not."""
    status = status_of(err)
    if status == 403 and _signed_url_refused(err):
        return "HTTP 403 from a signed upload URL (expired, or the server restarted); a new one is requested"
    if status is not None:
        return f"HTTP {status}" if status >= 500 or status in (408, 429) else None
    for cause in causes(err):
        if isinstance(cause, TRANSIENT):
            return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no answer'}"
    return None


def _signed_url_refused(err: BaseException) -> bool:
    """The request that got `err`'s answer carried no token: an upload to a signed (pre-authorised) URL, whose
    refusal says the URL is stale, not that the token cannot write."""
    for cause in causes(err):
        response = getattr(cause, "response", None)
        request = getattr(response, "_request", None)  # httpx raises for `.request` on a response without one
        if isinstance(cause, HfHubHTTPError) and request is not None:
            return request.method == "PUT" and "authorization" not in request.headers
    return False


def unreachable(what: str, err: BaseException) -> Exception:
    """The one-line error for `what` when the Hub could not be reached (a HubUnreachableError to raise from `err`)."""
    from huggingface_hub import constants as hub_constants

    from hubtune.errors import HubUnreachableError

    innermost = list(causes(err))[-1]
    cause = f"{type(innermost).__name__}: {str(innermost).splitlines()[0] if str(innermost) else 'no answer'}"
    return HubUnreachableError(f"{what}: the Hub at {hub_constants.ENDPOINT} could not be reached ({cause}; each "
                               f"request waits at most HUBTUNE_HUB_TIMEOUT {timeout_s():g}s) and nothing cached can "
                               "stand in; check the network and HF_ENDPOINT, then run it again")


@contextlib.contextmanager
def answered(what: str) -> Iterator[None]:
    """Inside it, a Hub that does not answer (refused, timed out, 408/429/5xx) raises `unreachable(what, ...)`."""
    try:
        yield
    except Exception as err:
        from hubtune.errors import HubtuneError

        if isinstance(err, HubtuneError) or transient_reason(err) is None:
            raise
        raise unreachable(what, err) from err


def attempts_of(err: BaseException) -> int:
    """How many times `retrying` ran the call that ended in `err` (1 when it was not retried)."""
    return getattr(err, "hubtune_attempts", 1)


def retrying(what: str, fn: Callable[[], Any], retries: int, wait: float,
             cancel: threading.Event | None = None, deadline: float | None = None) -> Any:
    """Run `fn`; retry transient failures up to `retries` times, waiting `wait`, 2*`wait`, ... seconds between.

    The error that ends the attempts carries their number (`attempts_of`). `cancel`, when set, stops the retries: the
    caller no longer wants the result. No attempt starts after `deadline` (time.monotonic()).
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:  # what is not transient propagates unchanged
            err.hubtune_attempts = attempt + 1  # type: ignore[attr-defined]
            reason = transient_reason(err)
            if reason is None or attempt == retries or (cancel is not None and cancel.is_set()):
                raise
            delay = wait * 2**attempt
            if deadline is not None and time.monotonic() + delay >= deadline:
                err.hubtune_deadline = True  # type: ignore[attr-defined]
                raise
            logger.warning(f"{what} failed ({reason}); retrying in {delay:.3g}s ({attempt + 1}/{retries})")
            if cancel is not None and cancel.wait(delay):
                raise
            if cancel is None:
                time.sleep(delay)
