"""Checkpoints that live on the Hub, so that a run survives losing its machine (`--hub-checkpoints`, `--resume hub`).

Every checkpoint the run saves is uploaded in the background to a branch of the run's repo (`checkpoints` by
default), one commit per checkpoint that adds it and deletes what the local retention dropped, so the branch holds
what OUTPUT_DIR/checkpoints holds. Uploads never hold training up: one runs at a time, a newer checkpoint replaces
one still waiting, failures are retried and then recorded. `--resume hub` (or `--resume hf://ORG/NAME[@BRANCH][/
checkpoints/step-NNNNNN]`) downloads the newest checkpoint that verifies against its manifest into
OUTPUT_DIR/checkpoints/ and resumes from it as from a local one; only the main process talks to the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import EntryNotFoundError

from hubtune import checkpoint, hub, hub_calls
from hubtune.errors import CheckpointError, ConfigError
from hubtune.files import CHECKPOINTS_DIR, STEP_PATTERN, sha256_file
from hubtune.hub_calls import retrying
from hubtune.hub_sync import remote_names
from hubtune.records import best_from_json
from hubtune.sources import repo_id_problem, revision_problem
from hubtune.tracking import RUNS_DIR

logger = logging.getLogger("hubtune")  # main process only: no need for accelerate's rank filter

HF_URL = re.compile(rf"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<branch>[^/]+))?(?:/{CHECKPOINTS_DIR}/(?P<name>{STEP_PATTERN}))?/?$")
HF_URL_FORM = "hf://ORG/NAME[@BRANCH][/checkpoints/step-NNNNNN]"


@dataclass(frozen=True)
class HubCheckpoints:
    """Where a run's checkpoints live on the Hub; `name` picks one (None: the newest that verifies)."""

    repo_id: str
    branch: str
    name: str | None = None
    explicit: bool = False  # hf://...: a repo that must exist (not the run's own, which may not exist yet)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.branch}" + (f"/{CHECKPOINTS_DIR}/{self.name}" if self.name else "")


def parse_resume(spec: str | None, push_to_hub: str | None, branch: str) -> HubCheckpoints | None:
    """The Hub checkpoints a --resume value names, or None for a local one (latest, a path).

    Raises:
        ConfigError: `hub` without --push-to-hub, a malformed hf:// address, or a repo id or branch the Hub refuses
            (`..`, a host, ...).
    """
    if spec == "hub":
        if not push_to_hub:
            raise ConfigError("--resume hub resumes from the checkpoints of --push-to-hub REPO; give --push-to-hub, "
                              "or --resume hf://ORG/NAME[@BRANCH]")
        where = HubCheckpoints(push_to_hub, branch)
    elif spec and spec.startswith("hf://"):
        match = HF_URL.match(spec)
        if not match:
            host, _, rest = spec.removeprefix("hf://").partition("/")
            hint = f" (with no host: the Hub is HF_ENDPOINT), e.g. hf://{rest}" if "/" in rest and (
                "." in host or ":" in host) else ""
            raise ConfigError(f"--resume {spec!r}: expected {HF_URL_FORM}{hint}")
        where = HubCheckpoints(match["repo"], match["branch"] or branch, match["name"], explicit=True)
    else:
        return None
    problem = repo_id_problem(where.repo_id) or revision_problem(where.branch)
    if problem:
        raise ConfigError(f"--resume {spec!r}: {problem}; expected {HF_URL_FORM}")
    return where


def _download(where: HubCheckpoints, name: str, out: Path) -> Path:
    """Download checkpoint `name` into OUTPUT_DIR/checkpoints/ (via a temporary folder); verified before it appears.

    With HF_HUB_OFFLINE=1 it is copied from the HF cache instead (a snapshot of the branch downloaded earlier).

    Raises:
        CheckpointError: the files on the Hub are incomplete or do not match their manifest.
    """
    final = checkpoint.step_dir(out, checkpoint.checkpoint_step(name))
    if final.is_dir():
        try:
            checkpoint.verify(final)
            return final  # already here (a resume on the same machine)
        except CheckpointError:
            shutil.rmtree(final)
    staging = final.parent / f".download-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fetched = staging / CHECKPOINTS_DIR / name
        if is_offline_mode():
            shutil.copytree(_cached_folder(where) / CHECKPOINTS_DIR / name, fetched)  # the cache's links, as files
        else:
            retrying(f"downloading {name}", lambda: snapshot_download(
                where.repo_id, revision=where.branch, allow_patterns=[f"{CHECKPOINTS_DIR}/{name}/*"], local_dir=staging),
                hub_calls.retries_n(), hub_calls.retry_wait_s())
        checkpoint.verify(fetched)
        os.replace(fetched, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(where: HubCheckpoints, out: Path) -> Path | None:
    """The newest checkpoint at `where` that downloads and verifies, now in OUTPUT_DIR/checkpoints/ (with the best
    checkpoint it names, which the export needs); None if the branch holds none (the run starts fresh). Main process
    only.

    Raises:
        ConfigError: an explicit checkpoint is missing or damaged; offline and not in the cache.
    """
    if is_offline_mode():
        names = _cached_names(where)
    else:
        names = [where.name] if where.name else remote_names(where)
    for name in names:
        logger.info(f"--resume: downloading {name} from {where.repo_id}@{where.branch}")
        try:
            path = _download(where, name, out)
        except (CheckpointError, OSError, ValueError) as err:
            if where.name:
                raise ConfigError(f"--resume {where}: cannot use it ({err})") from err
            logger.warning(f"--resume: skipping {name} on {where.repo_id}@{where.branch}: {err}; trying the previous "
                           "one")
            continue
        logger.info(f"--resume: downloaded {name} from {where.repo_id}@{where.branch} (verified)")
        _fetch_best(where, path, out)
        _fetch_runs(where, out)
        return path
    if names:
        raise ConfigError(f"--resume: no usable checkpoint at {where}: every one is damaged or incomplete")
    return None


def _fetch_best(where: HubCheckpoints, resumed: Path, out: Path) -> None:
    """Download the best checkpoint the resumed one names, if it is another: the run exports it at the end.

    A state.json that does not name one as a checkpoint folder (`../..`, an absolute path) downloads nothing: the
    resume refuses that checkpoint (resume_checks.check_saved says why).
    """
    try:
        record = best_from_json(json.loads((resumed / checkpoint.STATE_FILE).read_text())["run_state"]["best"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    best = record.checkpoint if record is not None else None
    if not isinstance(best, str) or checkpoint.step_of(best) is None or best == resumed.name:
        return
    try:
        _download(where, best, out)
        logger.info(f"--resume: downloaded the best checkpoint {best} too (verified)")
    except (CheckpointError, OSError, ValueError) as err:
        logger.warning(f"--resume: the best checkpoint {best} could not be downloaded ({err}); the export will be "
                       "the best intact checkpoint this run has")


def _fetch_runs(where: HubCheckpoints, out: Path) -> None:
    """The run's TensorBoard files as uploaded with its checkpoints, into OUTPUT_DIR/runs/ when this machine has
    none: the resumed run appends to them, so its curves start at step 1 (what the lost machine logged after the
    checkpoint is hidden, as on a local resume)."""
    if (out / RUNS_DIR).exists():
        return
    staging = out / CHECKPOINTS_DIR / ".download-runs"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if is_offline_mode():
            source = _cached_folder(where) / RUNS_DIR
        else:
            retrying("downloading the TensorBoard files", lambda: snapshot_download(
                where.repo_id, revision=where.branch, allow_patterns=[f"{RUNS_DIR}/*"], local_dir=staging),
                hub_calls.retries_n(), hub_calls.retry_wait_s())
            source = staging / RUNS_DIR
        if source.is_dir():
            shutil.copytree(source, out / RUNS_DIR)
            logger.info(f"--resume: downloaded the run's TensorBoard files into {out / RUNS_DIR}")
    except (ConfigError, OSError, ValueError) as err:  # the curves are not worth stopping the resume for
        logger.warning(f"--resume: the TensorBoard files on {where.repo_id}@{where.branch} could not be "
                       f"downloaded ({err}); the curves here start at the resumed step")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cached_folder(where: HubCheckpoints) -> Path:
    """With HF_HUB_OFFLINE=1: the snapshot of the branch in the HF cache (`hf download REPO --revision BRANCH`, or an
    earlier download into the same cache)."""
    try:
        return Path(snapshot_download(where.repo_id, revision=where.branch, allow_patterns=[f"{CHECKPOINTS_DIR}/*"],
                                      local_files_only=True))
    except Exception as err:
        raise ConfigError(f"--resume {where}: HF_HUB_OFFLINE is set and these checkpoints are not in the local HF "
                          f"cache; run without HF_HUB_OFFLINE, or first `hf download {where.repo_id} --revision "
                          f"{where.branch}` on a machine online with the same HF_HOME") from err


def _cached_names(where: HubCheckpoints) -> list[str]:
    """With HF_HUB_OFFLINE=1: the checkpoints of `where` in the HF cache, newest first."""
    folder = _cached_folder(where) / CHECKPOINTS_DIR
    found = checkpoint.newest_first(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if where.name:
        if where.name not in found:
            raise ConfigError(f"--resume {where}: HF_HUB_OFFLINE is set and this checkpoint is not in the local HF "
                              f"cache (cached: {', '.join(sorted(found)) or 'none'})")
        return [where.name]
    return found


def describe_remote(repo_id: str, branch: str) -> list[tuple[str, ...]]:
    """`hubtune checkpoints REPO[@BRANCH]`: one row per checkpoint on the branch (as `hubtune checkpoints DIR` lists a
    local run's) and whether its files on the Hub match its manifest (sizes and sha256, without downloading them).

    Raises:
        ConfigError: the repo or branch does not exist or cannot be read.
        PushError: the Hub could not be reached.
    """
    where = HubCheckpoints(repo_id, branch, explicit=True)
    api = hub.api()
    rows: list[tuple[str, ...]] = []
    names = remote_names(where, asking=f"hubtune checkpoints {repo_id}")
    for name in names:
        def listing(folder: str = f"{CHECKPOINTS_DIR}/{name}") -> list[Any]:
            return list(api.list_repo_tree(repo_id, path_in_repo=folder, revision=branch, expand=False))

        with hub.push_errors(repo_id, f"reading {name}"):  # a Hub that cannot be reached: as a push classifies it
            try:
                files = {e.path.rsplit("/", 1)[1]: e for e in retrying("listing a checkpoint", listing,
                                                                       hub_calls.retries_n(), hub_calls.retry_wait_s())}
                small = {f: Path(api.hf_hub_download(repo_id, f"{CHECKPOINTS_DIR}/{name}/{f}", revision=branch))
                         for f in (checkpoint.MANIFEST, checkpoint.STATE_FILE)}
                listed = json.loads(small[checkpoint.MANIFEST].read_text())["files"]
                mismatched = [f for f, meta in listed.items() if f not in files or files[f].size != meta["size"]
                              or (files[f].lfs.sha256 if files[f].lfs else _sha256(small.get(f))) != meta["sha256"]]
                state = json.loads(small[checkpoint.STATE_FILE].read_text())
                best = best_from_json(state["run_state"]["best"])
                marks = [m for m, on in (("best", best is not None and best.checkpoint == name),
                                         ("latest", name == names[0]), ("verified", not mismatched)) if on]
                if mismatched:
                    marks.append(f"DAMAGED: {', '.join(mismatched)} differ from the manifest")
                rows.append((name, *checkpoint.state_columns(state),
                             f"{sum(e.size for e in files.values()) / 2**20:.1f} MiB", ",".join(marks)))
            except (EntryNotFoundError, KeyError, ValueError) as err:
                rows.append((name, "-", "-", "-", "-", f"DAMAGED: {type(err).__name__}: {err}"))
    return rows


def _sha256(path: Path | None) -> str | None:
    """sha256 of a small file already downloaded (the Hub lists regular files with a git blob id, not a sha256)."""
    return sha256_file(path) if path is not None else None
