"""How hubtune calls the Hub: a timeout on every request, bounded retries of transient failures with backoff.

huggingface_hub's shared HTTP client has no timeout of its own for API calls (a server that holds a commit
request would hang the caller forever); `install_timeouts` gives it one, through the client factory the library
provides for such settings. `retrying` retries what a rerun could fix (connection errors, timeouts, 408, 429, 5xx)
and nothing else: a 401/403/404 is an answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterator

import httpx2
from huggingface_hub import set_client_factory
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

logger = logging.getLogger("hubtune")

TIMEOUT_ENV = "HUBTUNE_HUB_TIMEOUT"
RETRY_WAIT_ENV = "HUBTUNE_HUB_RETRY_WAIT"
RETRIES_ENV = "HUBTUNE_HUB_RETRIES"
DEFAULT_TIMEOUT_S = 300.0  # between two bytes of an answer; large commits on the Hub take a while to answer
CONNECT_TIMEOUT_S = 10.0
# the transport errors huggingface_hub's own backoff retries on, plus the OS-level ones under them
TRANSIENT: tuple[type[BaseException], ...] = (httpx2.TransportError, ConnectionError, TimeoutError)
_installed = threading.Lock()
_done = False


def timeout_s() -> float:
    """Seconds a Hub request may wait for the server (HUBTUNE_HUB_TIMEOUT, default 300)."""
    return _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, "a positive number of seconds", positive=True)


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


def install_timeouts() -> None:
    """Give huggingface_hub's shared HTTP client a connect and a read/write timeout (once per process)."""
    global _done
    with _installed:
        if _done:
            return
        seconds = timeout_s()

        def client() -> httpx2.Client:
            session = _http.default_client_factory()  # keeps the library's request hooks (headers, offline mode)
            session.timeout = httpx2.Timeout(seconds, connect=min(CONNECT_TIMEOUT_S, seconds))
            return session

        set_client_factory(client)
        _done = True


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
    if status is not None:
        return f"HTTP {status}" if status >= 500 or status in (408, 429) else None
    for cause in causes(err):
        if isinstance(cause, TRANSIENT):
            return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no answer'}"
    return None


def attempts_of(err: BaseException) -> int:
    """How many times `retrying` ran the call that ended in `err` (1 when it was not retried)."""
    return getattr(err, "hubtune_attempts", 1)


def retrying(what: str, fn: Callable[[], Any], retries: int, wait: float,
             cancel: threading.Event | None = None) -> Any:
    """Run `fn`; retry transient failures up to `retries` times, waiting `wait`, 2*`wait`, ... seconds between.

    The error that ends the attempts carries their number (`attempts_of`). `cancel`, when set, stops the retries: the
    caller no longer wants the result.
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
            logger.warning(f"{what} failed ({reason}); retrying in {delay:.3g}s ({attempt + 1}/{retries})")
            if cancel is not None and cancel.wait(delay):
                raise
            if cancel is None:
                time.sleep(delay)
