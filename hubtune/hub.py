"""The Hub side of a run: pin base model / dataset revisions, prefetch for offline nodes, push and verify results."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import logging
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubtune import __version__

logger = logging.getLogger("hubtune")

# What a pushed repo holds: the timm export, the card and its plots, the run's record.
PUSH_PATTERNS = ["config.json", "model.safetensors", "README.md", "metrics.json", "train_config.yaml", "plots/*.png"]
CHECKPOINT_PATTERNS = ["checkpoints/step-*/*"]
CARD_MARKER = "<!-- hubtune-card sha256:"

try:  # the transport errors huggingface_hub itself retries on
    import httpx2

    TRANSIENT: tuple[type[BaseException], ...] = (OSError, TimeoutError, httpx2.TransportError)
except ImportError:  # pragma: no cover - older huggingface_hub on httpx/requests
    TRANSIENT = (OSError, TimeoutError)


class PushError(RuntimeError):
    """A push could not complete; the local output is untouched and the same push can be run again."""


def api(token: str | bool | None = None, endpoint: str | None = None) -> HfApi:
    return HfApi(endpoint=endpoint, library_name="hubtune", library_version=__version__, token=token)


def parse_model_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) for a Hub model spec, None for a timm architecture or local-dir:."""
    if spec.startswith("local-dir:") or ("/" not in spec):
        return None
    repo = spec.removeprefix("hf-hub:")
    repo, _, revision = repo.partition("@")
    return repo, revision or None


@contextlib.contextmanager
def model_repo_errors(spec: str) -> Iterator[None]:
    """Turn the Hub client's typed errors about a --model repo into one-line ValueErrors."""
    try:
        yield
    except GatedRepoError as err:
        raise ValueError(f"--model {spec!r} is gated: accept its licence on the Hub and set HF_TOKEN") from err
    except RevisionNotFoundError as err:
        raise ValueError(f"--model {spec!r}: that revision does not exist") from err
    except RepositoryNotFoundError as err:
        raise ValueError(f"--model {spec!r}: no such model repo on the Hub (private? set HF_TOKEN)") from err


def resolve_model(spec: str, token: str | None = None) -> tuple[str, dict[str, Any]]:
    """The timm model name pinned to a commit sha, and {id, revision, spec, license} of the base model.

    Raises:
        ValueError: the repo or revision does not exist, or the repo is gated/private without a token.
    """
    parsed = parse_model_spec(spec)
    if parsed is None:
        return spec, {"id": None, "revision": None, "spec": spec, "license": None}
    repo, revision = parsed
    if is_offline_mode():
        sha = _cached_sha(repo, revision, "model")
        return f"hf-hub:{repo}" + (f"@{sha or revision}" if (sha or revision) else ""), {
            "id": repo, "revision": sha or revision, "spec": spec, "license": None}
    with model_repo_errors(spec):
        info = api(token).model_info(repo, revision=revision)
    card = info.card_data.to_dict() if info.card_data else {}
    return f"hf-hub:{repo}@{info.sha}", {"id": repo, "revision": info.sha, "spec": spec,
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
        ValueError: the dataset was not prefetched.
    """
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise ValueError(
            f"--dataset {repo!r} is not in the local cache and HF_HUB_OFFLINE is set; run "
            f"`hubtune prefetch --dataset {repo}` on a machine with access to the Hub first"
        ) from err


def prefetch(model: str | None, dataset: str | None, dataset_revision: str | None = None,
             token: str | None = None) -> dict[str, str]:
    """Download a base model and a dataset into the normal HF cache so HF_HUB_OFFLINE=1 runs work."""
    out = {}
    if model:
        parsed = parse_model_spec(model)
        if parsed is None:
            import timm

            cfg = timm.models.get_pretrained_cfg(model)
            if cfg is None or not cfg.hf_hub_id:
                raise ValueError(f"--model {model!r}: no Hub weights to prefetch (give a Hub id such as timm/resnet50.a1_in1k)")
            parsed = (cfg.hf_hub_id, None)
        out["model"] = snapshot_download(parsed[0], revision=parsed[1], token=token,
                                         allow_patterns=["*.json", "*.safetensors", "*.md"])
    if dataset:
        out["dataset"] = snapshot_download(dataset, repo_type="dataset", revision=dataset_revision, token=token)
    return out


def files_to_push(output_dir: Path, push_checkpoints: bool = False) -> list[str]:
    patterns = PUSH_PATTERNS + (CHECKPOINT_PATTERNS if push_checkpoints else [])
    found = [p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()]
    return sorted(f for f in found if any(fnmatch.fnmatch(f, pat) for pat in patterns) and "/.tmp-" not in f)


def mark_card(text: str) -> str:
    """Append a hash of the generated card so a later push can tell whether a human edited it on the Hub."""
    body = text.split(CARD_MARKER)[0].rstrip("\n") + "\n"
    return f"{body}\n{CARD_MARKER}{hashlib.sha256(body.encode()).hexdigest()} -->\n"


def card_was_edited(remote: str) -> bool:
    """True if a card on the Hub is not exactly what hubtune generated (or was not generated by hubtune)."""
    if CARD_MARKER not in remote:
        return True
    body, _, rest = remote.partition(CARD_MARKER)
    body = body.rstrip("\n") + "\n"
    return rest.split(" ")[0].strip() != hashlib.sha256(body.encode()).hexdigest()


def _retrying(what: str, fn: Callable[[], Any], retries: int, wait: float) -> Any:
    """Run `fn`, retrying transient failures (network, 5xx, 429) with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status is None or not (status >= 500 or status in (408, 429)) or attempt == retries:
                raise
            reason = f"HTTP {status}"
        except TRANSIENT as err:
            if attempt == retries:
                raise
            reason = f"{type(err).__name__}: {err}"
        delay = wait * 2**attempt
        logger.warning(f"{what} failed ({reason}); retrying in {delay:.0f}s ({attempt + 1}/{retries})")
        time.sleep(delay)


def push(output_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, push_checkpoints: bool = False, overwrite_card: bool = False,
         token: str | bool | None = None, retries: int = 4, retry_wait: float = 2.0,
         endpoint: str | None = None) -> str:
    """Push a run's export in one commit, verify the files on the Hub, and return the commit URL.

    Raises:
        ValueError: the folder is not a hubtune export.
        PushError: the Hub refused or could not be reached; nothing local changed, rerun to complete.
    """
    folder = Path(output_dir)
    for required in ("config.json", "model.safetensors"):
        if not (folder / required).is_file():
            raise ValueError(f"{folder} is not a hubtune export: {required} is missing (train first)")
    hub = api(token, endpoint)
    files = files_to_push(folder, push_checkpoints)
    # what is uploaded: the files as they are, except the card, which carries a hash of itself (see card_was_edited)
    contents: dict[str, bytes | Path] = {name: folder / name for name in files}
    if "README.md" in contents:
        contents["README.md"] = mark_card((folder / "README.md").read_text(encoding="utf-8")).encode()
    try:
        _retrying("create_repo", lambda: hub.create_repo(repo_id, private=private, exist_ok=True), retries, retry_wait)
        if revision:
            _retrying("create_branch", lambda: hub.create_branch(repo_id, branch=revision, exist_ok=True),
                      retries, retry_wait)
        if "README.md" in contents and not overwrite_card and _remote_card_edited(hub, repo_id, revision):
            logger.warning(f"README.md on {repo_id} was edited on the Hub; keeping it (pass --overwrite-card)")
            del contents["README.md"]
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
                      for name, data in contents.items()]
        info = _retrying("upload", lambda: hub.create_commit(
            repo_id, operations, revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with hubtune {__version__}"), retries, retry_wait)
        _verify(hub, repo_id, info.oid, contents)
    except (RepositoryNotFoundError, HfHubHTTPError, *TRANSIENT) as err:
        raise PushError(_push_failure(err, repo_id, folder)) from err
    logger.info(f"pushed {len(contents)} files to {info.commit_url} (verified size and hash on the Hub)")
    return info.commit_url


def _remote_card_edited(hub: HfApi, repo_id: str, revision: str | None) -> bool:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hub.hf_hub_download(repo_id, "README.md", revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return False
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return card_was_edited(text)


def _verify(hub: HfApi, repo_id: str, commit: str, contents: dict[str, bytes | Path]) -> None:
    """Re-read the repo at the pushed commit; every pushed file must match the local one in size and hash."""
    remote = {entry.path: entry for entry in hub.get_paths_info(repo_id, list(contents), revision=commit)}
    for name, data in contents.items():
        blob = data if isinstance(data, bytes) else data.read_bytes()
        entry = remote.get(name)
        if entry is None:
            raise PushError(f"verification failed: {name} is not in {repo_id}@{commit[:8]}")
        if entry.size != len(blob):
            raise PushError(f"verification failed: {name} is {entry.size} bytes on the Hub, {len(blob)} here")
        if entry.lfs:
            ok = entry.lfs.sha256 == hashlib.sha256(blob).hexdigest()
        else:
            ok = entry.blob_id == hashlib.sha1(f"blob {len(blob)}\0".encode() + blob).hexdigest()
        if not ok:
            raise PushError(f"verification failed: {name} on {repo_id}@{commit[:8]} differs from the local file")


def _push_failure(err: BaseException, repo_id: str, folder: Path) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    rerun = f"nothing in {folder} was changed; run the same push again to complete it"
    if status == 401:
        return f"push to {repo_id} refused (401): set HF_TOKEN or run `hf auth login`; {rerun}"
    if status == 403:
        return f"push to {repo_id} refused (403): your token cannot write to {repo_id.split('/')[0]!r}; {rerun}"
    if isinstance(err, RepositoryNotFoundError):
        return f"push to {repo_id} failed: repo not found or not yours; {rerun}"
    return f"push to {repo_id} failed after retries ({type(err).__name__}: {str(err).splitlines()[0]}); {rerun}"


class BackgroundPusher:
    """Push snapshots of the export while training goes on: one push at a time, only the newest one waiting.

    A failed push is logged and forgotten; it never stops training.
    """

    def __init__(self, repo_id: str, **push_kwargs: Any) -> None:
        self.repo_id = repo_id
        self.push_kwargs = {**push_kwargs, "retries": push_kwargs.get("retries", 2)}
        self._pending: queue.Queue[Path | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="hubtune-push", daemon=True)
        self._thread.start()
        self.pushed: list[str] = []

    def submit(self, export_dir: Path) -> None:
        """Queue a snapshot folder (owned by the pusher from now on), replacing a waiting older one."""
        try:
            older = self._pending.get_nowait()
            if older is not None:
                shutil.rmtree(older, ignore_errors=True)
        except queue.Empty:
            pass
        self._pending.put(export_dir)

    def close(self) -> None:
        """Wait for the push in flight and the waiting one."""
        self._pending.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (folder := self._pending.get()) is not None:
            try:
                self.pushed.append(push(folder, self.repo_id, **self.push_kwargs))
            except (PushError, ValueError) as err:
                logger.warning(f"background push skipped: {err}")
            finally:
                shutil.rmtree(folder, ignore_errors=True)


def snapshot_dir(output_dir: Path) -> Path:
    """A private folder for one background-push snapshot."""
    return Path(tempfile.mkdtemp(prefix=".push-", dir=output_dir))


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a finished run's --output-dir")
    parser.add_argument("repo_id", help="Hub repo to push to (user/name)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--push-checkpoints", action="store_true", help="also push checkpoints/ (optimizer state)")
    parser.add_argument("--overwrite-card", action="store_true", help="replace a README.md edited on the Hub")
    parser.add_argument("--retries", type=int, default=4, help="retries of transient failures (default: 4)")


def run_push(args: argparse.Namespace) -> int:
    url = push(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, push_checkpoints=args.push_checkpoints,
               overwrite_card=args.overwrite_card, retries=args.retries)
    print(url)
    return 0


def add_prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model (Hub id or timm architecture)")
    parser.add_argument("--dataset", default=None, help="Hub dataset id")
    parser.add_argument("--dataset-revision", default=None, help="dataset branch, tag or commit")


def run_prefetch(args: argparse.Namespace) -> int:
    if not args.model and not args.dataset:
        raise ValueError("prefetch needs --model and/or --dataset")
    for kind, path in prefetch(args.model, args.dataset, args.dataset_revision).items():
        print(f"{kind}: {path}")
    print("cached; on nodes without internet run with HF_HUB_OFFLINE=1")
    return 0
