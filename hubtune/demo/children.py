"""Child processes of `hubtune demo`: one at a time, in its own process group, output streamed and narrated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from hubtune.demo.narration import HIDDEN_LINES, say

DEMO_USER, DEMO_TOKEN = "demo-user", "hubtune-demo-write-token"


class Children:
    """Runs one child process at a time in its own process group, streaming its output; stops it on Ctrl-C."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.current: subprocess.Popen | None = None

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
        lines = []
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n").removeprefix("[RANK 0] ")
            lines.append(line)
            if not HIDDEN_LINES.match(line):
                say(f"    | {line}")
            if on_line is not None:
                on_line(line, proc)
        code = proc.wait()
        self.current = None
        return code, lines

    def stop(self) -> None:
        """SIGINT to the running child's process group (training saves a checkpoint), SIGKILL after 30 s."""
        proc, self.current = self.current, None
        if proc is None:
            return
        signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # the launcher exits at once; train.py, adopted by this process, is waited for until it has saved
        if not wait_group(proc.pid, 30):
            signal_group(proc.pid, signal.SIGKILL)
            wait_group(proc.pid, 5)
        proc.wait()


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
    """Adopt orphaned descendants (Linux), so the demo can read the exit code of train.py after its launcher died."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
