"""Child processes of `hubtune demo`: one at a time, in its own process group, output streamed and narrated.

None outlives the demo: on Ctrl-C or SIGTERM the running child's whole process group is stopped (gracefully, so
training saves a checkpoint) and waited for, train.py included when its launcher exited first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from hubtune.demo.narration import HIDDEN_LINES, say

DEMO_USER, DEMO_TOKEN = "demo-user", "hubtune-demo-write-token"
STOP_GRACE_S = 30  # how long a stopped child may take to save its checkpoint and exit before it is killed


class Children:
    """Runs one child process at a time in its own process group, streaming its output; stops it on Ctrl-C."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.current: subprocess.Popen | None = None
        self._stopping: int | None = None

    def run(self, cmd: list[str], home: Path, on_line: Callable[[str, subprocess.Popen], None] | None = None,
            token: str | None = DEMO_TOKEN) -> tuple[int, list[str]]:
        """Run `cmd` with HF_HOME=`home`; echo its output indented; return (exit code, output lines)."""
        env = {**self.env, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "HF_DATASETS_CACHE": str(home / "datasets")}
        if token is None:
            env.pop("HF_TOKEN", None)
        # own session: a terminal's Ctrl-C reaches only the demo, which then stops the child gracefully
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        self.current = proc
        lines: list[str] = []
        _echo(proc, lines, on_line)
        code = proc.wait()
        self.current = None
        return code, lines

    def stop(self) -> None:
        """SIGINT to the running child's process group (training saves a checkpoint); SIGKILL after STOP_GRACE_S.

        Its output is still echoed meanwhile; `kill` (a second Ctrl-C) ends the wait at once.
        """
        proc, self.current = self.current, None
        if proc is None:
            return
        self._stopping = proc.pid
        echo = threading.Thread(target=_echo, args=(proc, []), daemon=True)
        echo.start()
        signal_group(proc.pid, signal.SIGINT)
        # the launcher may exit first: train.py, adopted by this process (a subreaper), is waited for too
        if not wait_group(proc.pid, STOP_GRACE_S):
            signal_group(proc.pid, signal.SIGKILL)
            wait_group(proc.pid, 10)
        self._stopping = None
        proc.wait()
        echo.join(timeout=5)  # the child's last lines (where it saved) before the demo's own

    def kill(self) -> None:
        """SIGKILL the process group that `stop` is waiting for (a second Ctrl-C: do not wait for a checkpoint)."""
        if self._stopping is not None:
            signal_group(self._stopping, signal.SIGKILL)


def _echo(proc: subprocess.Popen, lines: list[str],
          on_line: Callable[[str, subprocess.Popen], None] | None = None) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n").removeprefix("[RANK 0] ")
        lines.append(line)
        if not HIDDEN_LINES.match(line):
            say(f"    | {line}")
        if on_line is not None:
            on_line(line, proc)


class ExitWatch:
    """Notes, from a thread, when process `pid` ends; its exit code too when this process is the one to reap it.

    An exit code goes to the parent. train.py's parent is its launcher: with accelerate < 1.16 the launcher died at
    once on SIGTERM, this process (a subreaper) adopted train.py and reads its code here; accelerate launch 1.16+
    forwards the signal, waits for train.py and reaps it, and `code` stays None.
    """

    def __init__(self, pid: int) -> None:
        self.started = time.monotonic()
        self.code: int | None = None
        self.ended_after_s: float | None = None
        try:
            self._proc: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._proc = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        code = self._proc.wait() if self._proc is not None else None
        self.code = None if code is None else int(code)
        self.ended_after_s = round(time.monotonic() - self.started, 2)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def wait_group(pgid: int, timeout: float) -> bool:
    """Wait until no process of group `pgid` is left, reaping adopted ones; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux); empty where /proc does not list them."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so none is left running, and train.py's exit code can be read after its
    launcher died (accelerate < 1.16)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
