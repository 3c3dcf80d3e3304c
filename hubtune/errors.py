"""Every error a user can cause, defined once, and the one place where they become a line on stderr.

Library code only raises these. `run_guarded` (used by every entry point: `hubtune ...`, `python -m
hubtune.train`, `accelerate launch hubtune/train.py`) turns them into `hubtune: error: ...` and an exit code; any
other exception is a bug in hubtune and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2


class HubtuneError(Exception):
    """An error the user can act on: the message names the bad value, what would be accepted, and the fix."""

    exit_code = EXIT_FAILED


class ConfigError(HubtuneError, ValueError):
    """A flag, config file, argument or input path has a value hubtune cannot use."""

    exit_code = EXIT_USAGE


class DataError(ConfigError):
    """The dataset cannot be opened or does not fit the task (missing column, one class, no validation images)."""


class ModelSourceError(ConfigError):
    """The model to start from or to load does not exist, cannot be read, or is refused (pickled weights)."""


class OutputDirError(ConfigError):
    """--output-dir cannot be used: it is a file, not writable, or holds another run."""


class CompileModeError(ConfigError):
    """--compile was asked for in a process whose Accelerate state was already set up without it."""


class BadDataError(HubtuneError, RuntimeError):
    """More images than --max-bad-fraction allows could not be decoded."""


MAX_BAD_FRACTION = 0.01  # --max-bad-fraction's default, for `hubtune train` and `hubtune evaluate` alike


def check_bad_fraction(bad: int, seen: int, limit: float, what: str) -> None:
    """Stop when more than `limit` (--max-bad-fraction) of the `seen` `what` images (counted over all processes)
    were unreadable: the one rule `hubtune train` and `hubtune evaluate` apply.

    Raises:
        BadDataError: bad / seen is over `limit`.
    """
    if seen and bad / seen > limit:
        raise BadDataError(f"{bad} of {seen} {what} images ({bad / seen:.1%}) could not be decoded, over "
                           f"--max-bad-fraction {limit}; fix the data or raise the limit")


class DivergedError(HubtuneError, FloatingPointError):
    """The loss became NaN or infinite."""


class CheckpointError(HubtuneError, RuntimeError):
    """A checkpoint is missing, incomplete or damaged."""


class DiskFullError(HubtuneError, OSError):
    """A file could not be written for lack of space; nothing written before was lost."""


class PushError(HubtuneError, RuntimeError):
    """A push could not complete; the local output is untouched and the same push can be run again."""


class ExportError(HubtuneError, RuntimeError):
    """`hubtune export` could not make a graph that matches the model (or lacks its extra); nothing was written."""


class HubUnreachableError(HubtuneError, ConnectionError):
    """The Hub did not answer (timeouts, refused connections) and nothing cached could stand in."""


class DemoError(HubtuneError, RuntimeError):
    """A step of `hubtune demo` failed; the message says which and shows the end of its output."""


class TrainingInterrupted(HubtuneError):
    """Raised after the checkpoint requested by SIGTERM/SIGINT has been written."""

    def __init__(self, signum: int, checkpoint: Path, command: str, hub: str | None = None) -> None:
        """`hub`: where the checkpoint was uploaded (--hub-checkpoints), or why it could not be."""
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        message = f"{name} received: saved {checkpoint}; resume with: {command} --resume latest"
        if hub is not None and hub.startswith("uploaded to "):
            message += f"; {hub}: on another machine, resume with: {command} --resume hub"
        elif hub is not None:
            message += f"; {hub}"
        super().__init__(message)


class Problems:
    """The errors of independent checks, collected so that one run reports them all at once."""

    def __init__(self) -> None:
        self.errors: list[HubtuneError] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        """A HubtuneError raised inside is kept for `raise_all` instead of ending the run here."""
        try:
            yield
        except HubtuneError as err:
            self.errors.append(err)

    def raise_all(self, when: str) -> None:
        """Raise the one error found, or one listing all of them (exit code 2 when each is a usage error)."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            kind = ConfigError if all(isinstance(e, ConfigError) for e in self.errors) else HubtuneError
            listed = (str(e).replace("\n", "\n    ") for e in self.errors)  # a problem's own lines stay under it
            raise kind(f"{len(self.errors)} problems found {when}:\n  " + "\n  ".join(listed))


def did_you_mean(value: str, candidates: Any) -> str:
    """"; did you mean X?" naming the candidates closest to a mistyped value (the best and any as close), "" when
    none is close (difflib's similarity ratio, as Python 3.14's argparse suggests)."""
    import difflib

    def ratio(c: str) -> float:
        return difflib.SequenceMatcher(None, str(value), c).ratio()

    scored = sorted(((ratio(str(c)), str(c)) for c in candidates), key=lambda rc: -rc[0])
    close = [c for r, c in scored[:3] if r >= 0.6 and r >= scored[0][0] - 0.05]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]
    return f"; did you mean {listed}?"


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run `fn`; a HubtuneError becomes one line on stderr and its exit code, Ctrl-C exit code 130."""
    try:
        result = fn()
    except TrainingInterrupted as stop:
        print(f"hubtune: {stop}", file=sys.stderr)
        return stop.exit_code
    except HubtuneError as err:
        print(f"hubtune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("hubtune: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


class _PipeSafe:
    """A standard stream that goes quiet when its reader is gone (a launcher that exited: accelerate 1.16 pipes its
    child's stderr), instead of raising BrokenPipeError in whatever logs next, or at exit."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._silence()

    def _silence(self) -> None:
        # as Python's docs advise for SIGPIPE: the descriptor points at /dev/null from now on, so the interpreter's
        # own flush at exit has nowhere to fail
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def quiet_broken_pipes() -> None:
    """stdout and stderr of an entry point survive their reader going away (see _PipeSafe)."""
    if not isinstance(sys.stderr, _PipeSafe):
        sys.stderr = _PipeSafe(sys.stderr)  # type: ignore[assignment]
    if not isinstance(sys.stdout, _PipeSafe):
        sys.stdout = _PipeSafe(sys.stdout)  # type: ignore[assignment]


def get_logger(name: str = "hubtune") -> logging.LoggerAdapter:
    """Accelerate's multi-process logger (main process only unless told otherwise), whose lines carry `[RANK n]` only
    when the run has several processes."""
    from accelerate.logging import MultiProcessAdapter
    from accelerate.state import PartialState

    class RankWhenSeveral(MultiProcessAdapter):
        def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
            kwargs.setdefault("stacklevel", 2)  # as accelerate's: the caller's line, not this adapter's
            state = PartialState()
            return (f"[RANK {state.process_index}] {msg}" if state.num_processes > 1 else msg), kwargs

    return RankWhenSeveral(logging.getLogger(name), {})


def setup_logging() -> None:
    """hubtune's own messages at INFO; the libraries' (HTTP requests, ...) only when they warn."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("hubtune").setLevel(logging.INFO)
