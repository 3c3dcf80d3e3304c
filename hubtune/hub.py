"""The Hub side of a run: pin base model / dataset revisions, prefetch for offline nodes, push and verify results."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubtune import hub_calls
from hubtune.background import BackgroundPusher
from hubtune.errors import ConfigError, DataError, ModelSourceError, PushError
from hubtune.files import (
    CARD_FILE,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    PLOTS_DIR,
    STEP_GLOB,
    TMP_PREFIX,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
)
from hubtune.hub_calls import (
    attempts_of,
    causes,
    install_timeouts,
    push_timeout_s,
    retrying,
    status_of,
    transient_reason,
)
from hubtune.sources import (
    SAFETENSORS_ONLY,
    ModelSpec,
    check_weight_files,
    loadable_config,
    parse_model_spec,
    repo_id_problem,
)
from hubtune.tracking import RUNS_DIR
from hubtune.version import __version__

logger = logging.getLogger("hubtune")

CARD_MARKER = "<!-- hubtune-card sha256:"
BACKGROUND_RETRIES = 2  # of a push of a new best model while training goes on

def api(token: str | bool | None = None, endpoint: str | None = None) -> HfApi:
    """hubtune's HfApi client; every request it makes has a timeout (see hub_calls)."""
    install_timeouts()
    return HfApi(endpoint=endpoint, library_name="hubtune", library_version=__version__, token=token)


@contextlib.contextmanager
def model_repo_errors(spec: ModelSpec | str, what: str | None = None) -> Iterator[None]:
    """Inside it, the Hub client's typed errors about the model repo of `spec` become one-line ModelSourceErrors with
    the fix, for training's --model and `from_pretrained` alike. `what` names the source at the start of the message
    (default: `--model SPEC`)."""
    from huggingface_hub import constants

    parsed = parse_model_spec(spec) if isinstance(spec, str) else spec
    repo_id, revision = parsed.repo_id or parsed.spec, parsed.revision
    what = what or f"--model {parsed.spec!r}"
    url = f"{constants.ENDPOINT}/{repo_id}"
    try:
        yield
    except GatedRepoError as err:  # a kind of RepositoryNotFoundError: first
        raise ModelSourceError(f"{what}: {url} is gated: accept its licence there, then set HF_TOKEN or run "
                               "`hf auth login`") from err
    except RevisionNotFoundError as err:
        raise ModelSourceError(f"{what}: {url} has no revision {revision!r}; give an existing branch, tag or commit "
                               "sha") from err
    except RepositoryNotFoundError as err:
        raise ModelSourceError(f"{what}: no such model repo on the Hub (model repo {repo_id!r} not found at {url}; "
                               "private? set HF_TOKEN or run `hf auth login`)") from err


def resolve_model(spec: ModelSpec, token: str | None = None) -> tuple[str, dict[str, Any]]:
    """The timm model name pinned to a commit sha, and {id, revision, spec, license} of the base model.

    Raises:
        ModelSourceError: the repo or revision does not exist, or the repo is gated/private without a token.
    """
    if spec.kind != "hub":
        return spec.timm_name, {"id": None, "revision": None, "spec": spec.spec, "license": None}
    repo, revision = spec.hub_repo_id, spec.revision
    if is_offline_mode():
        sha = _cached_sha(repo, revision, "model")
        return f"hf-hub:{repo}" + (f"@{sha or revision}" if (sha or revision) else ""), {
            "id": repo, "revision": sha or revision, "spec": spec.spec, "license": None}
    with model_repo_errors(spec), hub_calls.answered(f"--model {spec.spec!r}"):
        info = api(token).model_info(repo, revision=revision)
    check_weight_files([s.rfilename for s in info.siblings or []], f"--model {spec.spec!r}", remedy=SAFETENSORS_ONLY)
    card = info.card_data.to_dict() if info.card_data else {}
    return f"hf-hub:{repo}@{info.sha}", {"id": repo, "revision": info.sha, "spec": spec.spec,
                                         "license": card.get("license")}


def _cached_sha(repo: str, revision: str | None, repo_type: str) -> str | None:
    """The commit sha of a cached snapshot (offline runs), if the repo was prefetched."""
    try:
        path = snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True)
    except (OSError, ValueError, HfHubHTTPError):
        return None
    return Path(path).name


def cached_dataset_dir(repo: str, revision: str | None) -> Path:
    """The prefetched snapshot of a Hub dataset, for HF_HUB_OFFLINE=1 runs.

    Raises:
        DataError: the dataset was not prefetched.
    """
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise DataError(
            f"--dataset {repo!r} is not in the local cache and HF_HUB_OFFLINE is set; run "
            f"`hubtune prefetch --dataset {repo}` on a machine with access to the Hub first"
        ) from err


def prefetch(model: str | None, dataset: str | None, dataset_revision: str | None = None,
             token: str | None = None) -> dict[str, str]:
    """Download a base model and a dataset into the normal HF cache so HF_HUB_OFFLINE=1 runs work."""
    out = {}
    if model:
        spec = parse_model_spec(model)
        revision: str | None
        if spec.kind == "hub":
            repo, revision = spec.hub_repo_id, spec.revision
        else:
            import timm

            cfg = timm.models.get_pretrained_cfg(model)
            if cfg is None or not cfg.hf_hub_id:
                raise ModelSourceError(f"--model {model!r}: no Hub weights to prefetch (give a Hub id such as "
                                       "timm/resnet50.a1_in1k)")
            repo, revision = cfg.hf_hub_id, None
        with _prefetch_errors(f"--model {model!r}"):
            out["model"] = snapshot_download(repo, revision=revision, token=token,
                                             allow_patterns=["*.json", "*.safetensors", "*.md"])
    if dataset:
        with _prefetch_errors(f"--dataset {dataset!r}"):
            out["dataset"] = snapshot_download(dataset, repo_type="dataset", revision=dataset_revision, token=token)
    return out


@contextlib.contextmanager
def _prefetch_errors(what: str) -> Iterator[None]:
    """A repo that does not exist, or a Hub that does not answer, as one line."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelSourceError(f"{what}: no such repo or revision on the Hub, or your token cannot read it (set "
                               "HF_TOKEN or run `hf auth login`)") from err
    except LocalEntryNotFoundError as err:
        raise hub_calls.unreachable(f"prefetching {what}", err) from err


def files_to_push(output_dir: Path, push_checkpoints: bool = False) -> list[str]:
    """What a pushed repo holds, of a run's files: the timm export, the card and its plots, the run's record,
    TensorBoard event files (the Hub's "Training metrics" tab), and the checkpoints when asked; nothing half-written.
    """
    patterns = [MODEL_CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, METRICS_FILE, TRAIN_CONFIG_FILE, f"{PLOTS_DIR}/*.png",
                f"{RUNS_DIR}/*"] + ([f"{CHECKPOINTS_DIR}/{STEP_GLOB}/*"] if push_checkpoints else [])
    found = [p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()]
    return sorted(f for f in found if any(fnmatch.fnmatch(f, pat) for pat in patterns)
                  and f"/{TMP_PREFIX}" not in f)


def mark_card(text: str) -> str:
    """Append a hash of the generated card so a later push can tell whether a human edited it on the Hub."""
    body = text.split(CARD_MARKER)[0].rstrip("\n") + "\n"
    return f"{body}\n{CARD_MARKER}{hashlib.sha256(body.encode()).hexdigest()} -->\n"


def card_was_edited(remote: str) -> bool:
    """True if a card on the Hub is not exactly what hubtune generated (or was not generated by hubtune): an edit
    anywhere, after the marker too, keeps the card."""
    return remote != mark_card(remote.split(CARD_MARKER)[0]) if CARD_MARKER in remote else True


@dataclass(frozen=True)
class PushTarget:
    """Where a commit goes and how it is made: built once by whoever decides to push (the CLI, the training run)."""

    repo_id: str
    revision: str | None = None  # the branch (created if missing); None: the default branch
    private: bool = False  # when the repo is created
    commit_message: str | None = None  # None: the caller's default
    overwrite_card: bool = False  # replace a README.md edited on the Hub since hubtune wrote it
    token: str | bool | None = None  # None: huggingface_hub's (HF_TOKEN, `hf auth login`); False: anonymous
    endpoint: str | None = None  # None: HF_ENDPOINT
    retries: int = 4  # of each Hub call's transient failures, waiting retry_wait, 2*retry_wait, ... seconds
    retry_wait: float = 2.0


def push(output_dir: str | Path, target: PushTarget, *, push_checkpoints: bool = False,
         cancel: threading.Event | None = None, rerun: str | None = None) -> str:
    """Push a run's export to `target` in one commit, verify the files on the Hub, and return the commit URL.

    Every call to the Hub has a timeout and is retried on transient failures (target.retries times). `cancel`, when
    set, stops the push before its next call (background pushes); `rerun`: the command that completes the push.

    Raises:
        ConfigError: the folder is not a hubtune export, or the repo id is not a valid Hub repo id.
        PushError: the Hub refused or could not be reached; nothing local changed, rerun to complete.
    """
    repo_id = target.repo_id
    problem = repo_id_problem(repo_id)
    if problem:
        raise ConfigError(f"{repo_id!r} is not a Hub repo id ({problem}); expected ORG/NAME, e.g. you/my-model")
    folder = Path(output_dir)
    for required in (MODEL_CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / required).is_file():
            raise ConfigError(f"{folder} is not a hubtune export: {required} is missing (train first)")
    # what is uploaded: the files as they are, except the card, which carries a hash of itself (see
    # card_was_edited), and config.json, in the form transformers loads too (exports made before it was fixed)
    contents: dict[str, bytes | Path] = {name: folder / name for name in files_to_push(folder, push_checkpoints)}
    if CARD_FILE in contents:
        contents[CARD_FILE] = mark_card((folder / CARD_FILE).read_text(encoding="utf-8")).encode()
    config = json.loads((folder / MODEL_CONFIG_FILE).read_text())
    if loadable_config(config) != config:
        contents[MODEL_CONFIG_FILE] = json.dumps(loadable_config(config), indent=2).encode()
    message = target.commit_message or f"Upload {folder.name} with hubtune {__version__}"
    return push_files(replace(target, commit_message=message), contents, cancel=cancel, folder=folder, rerun=rerun)


def push_files(target: PushTarget, contents: dict[str, bytes | Path], *, deletions: Sequence[str] = (),
               cancel: threading.Event | None = None, folder: Path | None = None, announce: bool = True,
               rerun: str | None = None) -> str:
    """One commit to `target` that adds `contents` ({path in repo: bytes or local file}) and deletes `deletions`,
    created (repo and branch) as needed, then verified file by file on the Hub; returns the commit URL.

    Unless target.overwrite_card, a README.md edited on the Hub since hubtune wrote it is kept. `announce`: log the
    commit (callers that say what the commit was for pass False). `folder` and `rerun`: the local folder and the
    command that completes the push, for the error message. No attempt starts after HUBTUNE_PUSH_TIMEOUT seconds
    (see hub_calls.push_timeout_s).

    Raises:
        PushError: the Hub refused or could not be reached, in one line (what, after how many attempts, the fix).
    """
    repo_id, revision = target.repo_id, target.revision
    hub = api(target.token, target.endpoint)
    contents = dict(contents)
    step = "create_repo"
    deadline = time.monotonic() + push_timeout_s()

    def call(what: str, fn: Callable[[], Any]) -> Any:
        nonlocal step
        step = what
        if cancel is not None and cancel.is_set():
            raise PushError(f"push to {repo_id} cancelled before {what}")
        return retrying(what, fn, target.retries, target.retry_wait, cancel, deadline)

    with push_errors(repo_id, lambda: step, folder, rerun):
        call("create_repo", lambda: hub.create_repo(repo_id, private=target.private, exist_ok=True))
        if revision:
            call("create_branch", lambda: hub.create_branch(repo_id, branch=revision, exist_ok=True))
        if CARD_FILE in contents and not target.overwrite_card and call(
                "reading the card on the Hub", lambda: _remote_card_edited(hub, repo_id, revision)):
            logger.warning(f"{CARD_FILE} on {repo_id} was edited on the Hub; keeping it (pass --overwrite-card)")
            del contents[CARD_FILE]
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
            for name, data in contents.items()]
        operations += [CommitOperationDelete(path_in_repo=name) for name in deletions]
        info = call("upload", lambda: hub.create_commit(repo_id, operations, revision=revision,
                                                         commit_message=target.commit_message or "hubtune"))
        remote = call("verification", lambda: _remote_entries(hub, repo_id, info.oid, list(contents)))
    _verify(repo_id, info.oid, operations, remote)
    if announce:
        files = "1 file" if len(contents) == 1 else f"{len(contents)} files"
        logger.info(f"pushed {files} to {info.commit_url} (verified size and hash on the Hub)")
    return info.commit_url


def _remote_card_edited(hub: HfApi, repo_id: str, revision: str | None) -> bool:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hub.hf_hub_download(repo_id, CARD_FILE, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return False
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return card_was_edited(text)


def _remote_entries(hub: HfApi, repo_id: str, commit: str, paths: list[str]) -> dict[str, Any]:
    return {entry.path: entry for entry in hub.get_paths_info(repo_id, paths, revision=commit)}


def _verify(repo_id: str, commit: str, operations: list[Any], remote: dict[str, Any]) -> None:
    """Every pushed file, as the Hub lists it at the pushed commit, must match what was uploaded in size and hash
    (the sha256 huggingface_hub computed of each file to upload it: large files are not read a second time)."""
    rerun = "nothing local was changed; run the same push again"
    for op in operations:
        if not isinstance(op, CommitOperationAdd):
            continue
        name, size = op.path_in_repo, op.upload_info.size
        entry = remote.get(name)
        if entry is None:
            raise PushError(f"verification failed: {name} is not in {repo_id}@{commit[:8]}; {rerun}")
        if entry.size != size:
            raise PushError(f"verification failed: {name} is {entry.size} bytes on {repo_id}@{commit[:8]}, "
                            f"{size} here; {rerun}")
        if entry.lfs:
            ok = entry.lfs.sha256 == op.upload_info.sha256.hex()
        else:  # a small file stored in git: its blob id
            with op.as_file() as f:
                blob = f.read()
            ok = entry.blob_id == hashlib.sha1(f"blob {len(blob)}\0".encode() + blob).hexdigest()
        if not ok:
            raise PushError(f"verification failed: {name} on {repo_id}@{commit[:8]} differs from the local file; "
                            f"{rerun}")


def push_failure(err: BaseException, repo_id: str, step: str, folder: Path | None = None,
                 command: str | None = None) -> str | None:
    """One line for a failed Hub call: what failed, why, and how to complete it; None for an unexpected error."""
    status, reason = status_of(err), transient_reason(err)
    if command is not None:
        rerun = f"nothing in {folder} was changed; complete the push with: {command}"
    elif folder is not None:
        rerun = f"nothing in {folder} was changed; run the same push again to complete it"
    else:
        rerun = "run it again to complete it"
    # reason is set for a 403 from a signed upload URL: the URL's fault (expired, or signed by a server since
    # restarted), not the token's
    if reason is None and status == 401:
        return f"push to {repo_id} refused (401): set HF_TOKEN or run `hf auth login`; {rerun}"
    if reason is None and status == 403:
        return f"push to {repo_id} refused (403): your token cannot write to {repo_id.split('/')[0]!r}; {rerun}"
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        return f"push to {repo_id} failed: repo not found or not yours; {rerun}"
    if reason is None and status is None:
        return None
    attempts = attempts_of(err)
    tries = f"after {attempts} attempts" if attempts > 1 else "at the first attempt"
    if getattr(err, "hubtune_deadline", False):
        tries += f" (no more within HUBTUNE_PUSH_TIMEOUT {push_timeout_s():g}s)"
    answer = next((c for c in causes(err) if isinstance(c, HfHubHTTPError)), err)
    detail = reason or f"HTTP {status}: {str(answer).splitlines()[0]}"
    return f"push to {repo_id} failed at {step} {tries} ({detail}); {rerun}"


@contextlib.contextmanager
def push_errors(repo_id: str, step: str | Callable[[], str], folder: Path | None = None,
                command: str | None = None) -> Iterator[None]:
    """Inside it, a failed Hub call about `repo_id` raises a one-line PushError (see push_failure); a PushError
    passes through, an unexpected error keeps its traceback. `step`: what was being done, or a function that says
    it when the failure comes."""
    try:
        yield
    except PushError:
        raise
    except Exception as err:
        message = push_failure(err, repo_id, step() if callable(step) else step, folder, command)
        if message is None:
            raise
        raise PushError(message) from err


def export_pusher(target: PushTarget) -> BackgroundPusher:
    """Pushes snapshots of the export (new best models) to `target`, retrying each call twice (a newer snapshot
    will follow); each snapshot folder is deleted after."""
    target = replace(target, retries=BACKGROUND_RETRIES)
    return BackgroundPusher(lambda folder, cancel: push(folder, target, cancel=cancel),
                            discard=lambda folder: shutil.rmtree(folder, ignore_errors=True))


def snapshot_dir(output_dir: Path) -> Path:
    """A private folder for one background-push snapshot."""
    return Path(tempfile.mkdtemp(prefix=".push-", dir=output_dir))

