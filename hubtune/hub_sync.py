"""`--hub-checkpoints` uploads, in a process of their own that outlives the trainer.

A stopped job must still get its last checkpoint to the Hub: `accelerate launch` (1.16+) answers a SIGTERM by
terminating the trainer's whole process tree and SIGKILLing it 5 s later, torchrun's agent does the same with its
own grace period, and a scheduler may signal every process at once. So the uploads do not run in the trainer: it
starts a small sync process (as wandb's service process does for run files), detached from its process tree and
session, that ignores SIGTERM/SIGINT, and hands it each saved checkpoint. When the trainer asks it to finish, or
exits or dies, the sync process uploads what is waiting for at most --hub-checkpoints-timeout seconds and exits.

Each upload is one commit that makes the branch mirror the local retention: it adds the new checkpoint and every
kept checkpoint that is not on the branch yet (one superseded during an outage included), and deletes what
retention dropped. The checkpoints are hard-linked into a snapshot folder when saved (retention may delete them
while they upload); the snapshot goes with its upload, and a snapshot left by a killed sync process is removed by
the next one. The sync process reports to the trainer over a pipe (the trainer logs its lines and keeps the record
metrics.json shows) and writes its own log to OUTPUT_DIR/checkpoints/hub-sync.log, which outlives both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hubtune.files import CHECKPOINTS_DIR, newest_first
from hubtune.records import CheckpointUploads, Failure
from hubtune.tracking import RUNS_DIR

logger = logging.getLogger("hubtune")

LOG_FILE = "hub-sync.log"
LOCK_FILE = ".hub-sync.lock"
SNAPSHOTS_PREFIX = ".hub-sync-"  # one folder per sync process: its snapshots, removed when it ends
LEGACY_SNAPSHOTS = ".upload-"  # snapshots of hubtune versions that uploaded in a thread
_POLL_S = 1.0  # how often the sync process checks that its trainer still lives while no command comes

# the grandchild runs in a new session: not in the trainer's process tree or process group, adopted by init
# and ignores SIGTERM/SIGINT/SIGHUP from its first instruction on (ignored signals stay ignored across exec)
_DETACH = ("import signal, subprocess, sys; fds = [int(f) for f in sys.argv[1].split(',')]; "
           "[signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]; "
           "subprocess.Popen(sys.argv[2:], pass_fds=fds, start_new_session=True, stdin=subprocess.DEVNULL, "
           "stdout=subprocess.DEVNULL)")


class Uploader:
    """The trainer's side: starts the sync process, hands it each saved checkpoint, and keeps what it reports."""

    def __init__(self, repo_id: str, branch: str, out: Path, private: bool, timeout: float) -> None:
        from hubtune import hub_calls

        # a bad HUBTUNE_HUB_RETRIES / _RETRY_WAIT / _TIMEOUT fails here, before training
        hub_calls.retries_n(), hub_calls.retry_wait_s(), hub_calls.timeout_s()
        self.repo_id, self.branch, self.out, self.timeout = repo_id, branch, out, timeout
        self.uploaded: list[str] = []
        self.failed: list[dict[str, str]] = []
        self.superseded: list[str] = []
        self.done = threading.Event()
        root = out / CHECKPOINTS_DIR
        root.mkdir(parents=True, exist_ok=True)
        self.snapshots = root / f"{SNAPSHOTS_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.log_path = root / LOG_FILE
        commands_r, self._commands = os.pipe()
        self._events, events_w = os.pipe()
        args = [sys.executable, "-m", "hubtune.hub_sync", "--repo", repo_id, "--branch", branch, "--out", str(out),
                "--snapshots", self.snapshots.name, "--timeout", str(timeout), "--trainer", str(os.getpid()),
                "--commands-fd", str(commands_r), "--events-fd", str(events_w)] + (["--private"] if private else [])
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
        try:
            with open(self.log_path, "ab") as log:
                subprocess.run([sys.executable, "-c", _DETACH, f"{commands_r},{events_w}", *args], env=env,
                               pass_fds=(commands_r, events_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               check=True, timeout=60)
        finally:
            os.close(commands_r)
            os.close(events_w)
        self._reader = threading.Thread(target=self._read_events, name="hubtune-hub-sync-events", daemon=True)
        self._reader.start()

    def submit(self, path: Path, retained: list[str]) -> None:
        """Upload checkpoint `path`; the branch keeps only `retained` (the local checkpoints, `path` among them)."""
        snapshot = self.snapshots / f"{LEGACY_SNAPSHOTS}{path.name}"
        shutil.rmtree(snapshot, ignore_errors=True)
        for name in dict.fromkeys([*retained, path.name]):  # hard links: no copy, and retention may delete them
            source = path.parent / name
            if source.is_dir():
                _link_tree(source, snapshot / CHECKPOINTS_DIR / name)
        runs = self.out / RUNS_DIR
        if runs.is_dir():  # the curves so far, copied: the trackers go on appending to these files
            shutil.copytree(runs, snapshot / RUNS_DIR, ignore_dangling_symlinks=True)
        self._send({"op": "upload", "snapshot": snapshot.name, "name": path.name, "keep": retained})

    def finish(self, timeout: float) -> bool:
        """Ask the sync process to upload what is waiting and end; wait at most `timeout` s. True once it ended."""
        self._send({"op": "finish", "timeout": timeout})
        return self.done.wait(timeout + 5)

    def abandon(self) -> None:
        """The trainer is failing: the sync process finishes on its own (bounded by its timeout); nobody waits."""
        self._send({"op": "finish", "timeout": self.timeout})

    def report(self) -> CheckpointUploads:
        """What metrics.json records: which checkpoints reached the Hub and which did not, and why."""
        return CheckpointUploads(self.repo_id, self.branch, tuple(self.uploaded),
                                 tuple(Failure(f["checkpoint"], f["error"]) for f in self.failed),
                                 tuple(self.superseded))

    def _send(self, message: dict[str, Any]) -> None:
        try:
            os.write(self._commands, (json.dumps(message) + "\n").encode())
        except OSError as err:  # the sync process is gone: its log says why
            if not self.done.is_set():
                logger.warning(f"--hub-checkpoints: the upload process is gone ({err}); see {self.log_path}")
                self.done.set()

    def _read_events(self) -> None:
        with os.fdopen(self._events, "rb") as events:
            for raw in events:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if "log" in event:
                    logger.log(event["level"], event["log"])
                elif event.get("event") == "uploaded":
                    self.uploaded.extend(n for n in event["names"] if n not in self.uploaded)
                elif event.get("event") == "failed":
                    self.failed.append({"checkpoint": event["name"], "error": event["error"]})
                elif event.get("event") == "superseded":
                    self.superseded.append(event["name"])
                elif event.get("event") == "done":
                    break
        self.done.set()


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            try:
                os.link(f, target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)


def remote_names(where: Any, asking: str = "--resume") -> list[str]:
    """The checkpoint folders on the branch of `where` (a hub_checkpoints.HubCheckpoints), newest step first; []
    when there is no repo, branch or folder yet. `asking`: what the user ran, for the error.

    Raises:
        ConfigError: an explicit (hf://) repo or branch does not exist, or the token may not read the repo.
    """
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from hubtune import hub, hub_calls
    from hubtune.errors import ConfigError

    api = hub.api()
    try:
        entries = hub_calls.retrying("listing the checkpoints on the Hub", lambda: list(
            api.list_repo_tree(where.repo_id, path_in_repo=CHECKPOINTS_DIR, revision=where.branch)),
            hub_calls.retries_n(), hub_calls.retry_wait_s())
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        if where.explicit or hub_calls.status_of(err) in (401, 403):
            raise ConfigError(f"{asking}: no checkpoints at {where} ({type(err).__name__}: the repo or branch does "
                              "not exist, or your token cannot read it: set HF_TOKEN)") from err
        return []
    return newest_first(Path(e.path).name for e in entries)


# --- the sync process


class _Events:
    """The sync process's reports to the trainer; writes never block and never fail (the trainer may be gone)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.lock = fd, threading.Lock()
        os.set_blocking(fd, False)

    def send(self, message: dict[str, Any]) -> None:
        with self.lock:
            if self.fd < 0:
                return
            try:
                os.write(self.fd, (json.dumps(message) + "\n").encode())
            except BlockingIOError:
                pass  # a trainer that stopped reading: the log file has it
            except OSError:
                os.close(self.fd)
                self.fd = -1


class _Relay(logging.Handler):
    def __init__(self, events: _Events) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.send({"log": record.getMessage(), "level": record.levelno})


def _alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        return started is None or psutil.Process(pid).create_time() == started
    except psutil.Error:
        return False


def serve(args: argparse.Namespace) -> int:
    """The sync process: upload the checkpoints the trainer hands over until it finishes or dies, then what is
    waiting, for at most --timeout seconds."""
    import fcntl
    import select

    import psutil

    from hubtune import hub, hub_calls
    from hubtune.background import BackgroundPusher

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the trainer's end decides ours (set at spawn too)
        signal.signal(signum, signal.SIG_IGN)
    events = _Events(args.events_fd)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    logger.addHandler(_Relay(events))
    try:
        trainer_started: float | None = psutil.Process(args.trainer).create_time()
    except psutil.Error:
        trainer_started = None
    root = args.out / CHECKPOINTS_DIR
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a sync process of an earlier segment of this run finishes first
        for stale in root.iterdir():  # snapshots of a sync process that was killed
            if stale.name.startswith((SNAPSHOTS_PREFIX, LEGACY_SNAPSHOTS)) and stale.name != args.snapshots:
                shutil.rmtree(stale, ignore_errors=True)
        snapshots = root / args.snapshots
        where = argparse.Namespace(repo_id=args.repo, branch=args.branch, explicit=False)
        keep: dict[str, tuple[str, list[str]]] = {}  # snapshot folder -> (its checkpoint, the retention then)
        uploaded: list[str] = []
        failed: set[str] = set()

        def upload(snapshot: Path, cancel: threading.Event) -> str:
            name, retained = keep[snapshot.name]
            wanted = set(retained) | {name}
            on_hub = remote_names(where)
            gone = [f"{CHECKPOINTS_DIR}/{n}/" for n in on_hub if n not in wanted]
            # the newest last, so the record's last entry is the checkpoint this upload was for
            adding = sorted(n for n in wanted if (n not in on_hub or n == name) and n != name) + [name]
            adding = [n for n in adding if (snapshot / CHECKPOINTS_DIR / n).is_dir()]
            contents: dict[str, bytes | Path] = {
                f"{CHECKPOINTS_DIR}/{n}/{f.name}": f for n in adding
                for f in sorted((snapshot / CHECKPOINTS_DIR / n).iterdir()) if f.is_file()}
            contents.update({f.relative_to(snapshot).as_posix(): f for f in sorted((snapshot / RUNS_DIR).rglob("*"))
                             if f.is_file()})
            target = hub.PushTarget(where.repo_id, revision=where.branch, private=args.private,
                                    commit_message=f"hubtune checkpoint {name}", overwrite_card=True,
                                    retries=hub_calls.retries_n(), retry_wait=hub_calls.retry_wait_s())
            hub.push_files(target, contents, deletions=gone, cancel=cancel, announce=False)
            caught_up = [n for n in adding if n != name]
            logger.info(f"uploaded checkpoint {name} to {where.repo_id}@{where.branch}"
                        + (f" (with {', '.join(caught_up)}, kept here and missing on the branch)" if caught_up else "")
                        + (f" (removed {len(gone)} older)" if gone else ""))
            uploaded.extend(adding)
            events.send({"event": "uploaded", "names": adding})
            return name

        def discard(snapshot: Path) -> None:
            name, _ = keep.pop(snapshot.name, (snapshot.name, []))
            if name not in uploaded and name not in failed:
                events.send({"event": "superseded", "name": name})
            shutil.rmtree(snapshot, ignore_errors=True)

        def failure(snapshot: Path, error: str) -> None:
            failed.add(keep[snapshot.name][0])
            events.send({"event": "failed", "name": keep[snapshot.name][0], "error": error})

        pusher = BackgroundPusher(upload, name="hubtune-checkpoints", discard=discard, on_failure=failure)
        timeout = args.timeout
        commands = os.fdopen(args.commands_fd, "rb", buffering=0)
        pending = b""
        while True:
            ready, _, _ = select.select([commands], [], [], _POLL_S)
            if not ready:
                if _alive(args.trainer, trainer_started):
                    continue
                logger.info("the trainer is gone; finishing the checkpoint uploads")
                break
            chunk = os.read(commands.fileno(), 65536)
            if not chunk:
                break  # the trainer exited or died
            pending += chunk
            *lines, pending = pending.split(b"\n")
            finish = False
            for line in lines:
                command = json.loads(line)
                if command["op"] == "upload":
                    keep[command["snapshot"]] = (command["name"], command["keep"])
                    pusher.submit(snapshots / command["snapshot"])
                elif command["op"] == "finish":
                    timeout, finish = float(command["timeout"]), True
            if finish:
                break
        ended = pusher.close(timeout, drain=True)
        if not ended:
            logger.warning(f"--hub-checkpoints: gave up after --hub-checkpoints-timeout {timeout:g}s; the branch has "
                           f"the checkpoints uploaded before")
        shutil.rmtree(snapshots, ignore_errors=True)
        events.send({"event": "done"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hubtune.hub_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--branch", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--snapshots", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--trainer", type=int, required=True)
    parser.add_argument("--commands-fd", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--private", action="store_true")
    started = time.time()
    code = serve(parser.parse_args(argv))
    logging.getLogger("hubtune").info(f"hub sync process ended after {time.time() - started:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
