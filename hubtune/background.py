"""Uploads that run in one background thread while training goes on (new best models, checkpoints)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from hubtune.records import BackgroundPushes, Failure

logger = logging.getLogger("hubtune")


class BackgroundPusher:
    """Runs uploads in one thread while training goes on: one at a time, only the newest one waiting (a newer
    submission replaces a waiting older one, which `discard` receives).

    `work(item, cancel)` does one upload and returns where it went; whatever it raises is logged, recorded in
    `failed` and passed to `on_failure(item, error)`, never raised: it does not stop training, and it does not end
    the thread.
    """

    def __init__(self, work: Callable[[Path, threading.Event], str], name: str = "hubtune-push",
                 discard: Callable[[Path], None] = lambda item: None,
                 on_failure: Callable[[Path, str], None] = lambda item, error: None) -> None:
        self.work, self.discard, self.on_failure = work, discard, on_failure
        self.cancel = threading.Event()  # set by close(): the upload in flight stops at its next Hub call
        self.pushed: list[str] = []
        self.failed: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._waiting: Path | None = None
        self._busy = False
        self._closed = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def report(self) -> BackgroundPushes:
        """What metrics.json records: the pushes that went through and those that failed, with why."""
        return BackgroundPushes(tuple(self.pushed), tuple(Failure(f["item"], f["error"]) for f in self.failed))

    def submit(self, item: Path) -> None:
        """Queue `item` (owned by the pusher from now on), replacing a waiting older one."""
        with self._cond:
            older, self._waiting = self._waiting, item
            self._cond.notify_all()
        if older is not None:
            self.discard(older)

    def close(self, timeout: float, drain: bool = False) -> bool:
        """Stop the thread: with `drain`, after the waiting item too; else drop it and cancel the one in flight.

        Waits at most `timeout` seconds; returns False (and logs why) if an upload was still running then.
        """
        with self._cond:
            self._closed = True
            dropped = None if drain else self._waiting
            if not drain:
                self._waiting = None
            self._cond.notify_all()
        if dropped is not None:
            self.discard(dropped)
        if not drain:
            self.cancel.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel.set()
            self._abandoned = True
            logger.warning(f"{self._thread.name}: an upload was still running after {timeout:.0f}s; left behind")
            return False
        return True

    def idle(self) -> bool:
        """Nothing waiting and nothing in flight."""
        with self._cond:
            return self._waiting is None and not self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                item, self._waiting = self._waiting, None
                if item is None:
                    return
                self._busy = True
            try:
                self.pushed.append(self.work(item, self.cancel))
            except Exception as err:  # noqa: BLE001 - recorded and logged; the thread must live on
                self.failed.append({"item": item.name, "error": str(err).splitlines()[0] if str(err) else repr(err)})
                if not self._abandoned:  # left behind by close(): the owner has moved on (its error may be last)
                    logger.warning(f"background upload of {item.name} failed: {self.failed[-1]['error']}")
                self.on_failure(item, self.failed[-1]["error"])
            finally:
                self.discard(item)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
