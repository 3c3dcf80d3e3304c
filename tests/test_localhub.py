"""The local Hub server driven by the real clients (huggingface_hub, datasets, timm): no mocks.

conftest.py points HF_ENDPOINT at the session ``hub`` before any HF import. Tests that need their own server
(tiny page size, restart, request logging) start a LocalHub on another port and pass ``endpoint=`` explicitly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from PIL import Image

from hubtune.localhub import LocalHub

TOKENS = {
    "tok-alice-write": ("alice", "write"),
    "tok-alice-read": ("alice", "read"),
    "tok-bob-write": ("bob", "write"),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo(ns: str = "alice", prefix: str = "t") -> str:
    return f"{ns}/{prefix}-{uuid.uuid4().hex[:10]}"


def _raw(method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None):
    """(status, headers, body) of one HTTP request, without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def api(hub, hub_token) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub_token)


@pytest.fixture
def small_hub(tmp_path):
    """A private server with page size 2, request logging on, and alice a member of org 'team'."""
    with LocalHub(tmp_path / "small", tokens=TOKENS, page_size=2, quiet=False, orgs={"alice": ["team"]}) as server:
        yield server


def test_create_repo_variants_and_whoami(hub, api):
    assert api.whoami()["name"] == "alice"
    assert HfApi(endpoint=hub.url, token="tok-alice-read").whoami()["auth"]["accessToken"]["role"] == "read"
    repo_id = _repo()
    url = api.create_repo(repo_id)
    assert url == f"{hub.url}/{repo_id}" and url.repo_id == repo_id
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # 409 carries `url`
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    private = api.create_repo(_repo(), private=True)
    assert api.model_info(private.repo_id).private is True
    api.update_repo_settings(private.repo_id, private=False)
    assert HfApi(endpoint=hub.url, token=False).model_info(private.repo_id).private is False
    dataset = api.create_repo(_repo(), repo_type="dataset")
    assert dataset == f"{hub.url}/datasets/{dataset.repo_id}"
    assert api.dataset_info(dataset.repo_id).id == dataset.repo_id
    assert api.repo_exists(dataset.repo_id, repo_type="dataset")
    assert not api.repo_exists(dataset.repo_id)  # not a model repo


def test_upload_folder_and_download_by_every_kind_of_revision(hub, api, tmp_path):
    repo_id = _repo()
    api.create_repo(repo_id)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "nested" / "weights.bin").write_bytes(os.urandom(5000))
    first = api.upload_folder(repo_id=repo_id, folder_path=src)
    api.create_branch(repo_id, branch="feature/x")
    api.create_branch(repo_id, branch="feature/x", exist_ok=True)
    api.create_tag(repo_id, tag="v1")
    api.create_tag(repo_id, tag="v1", exist_ok=True)
    second = api.upload_file(path_or_fileobj=b'{"a": 2}', path_in_repo="config.json", repo_id=repo_id)
    assert second.oid != first.oid

    def get(rev: str | None) -> str:
        return Path(hf_hub_download(repo_id, "config.json", revision=rev, cache_dir=tmp_path / "c")).read_text()

    assert get(None) == get("main") == get("refs/heads/main") == '{"a": 2}'
    for rev in (first.oid, first.oid[:7], "v1", "refs/tags/v1", "feature/x"):
        assert get(rev) == '{"a": 1}', rev
    weights = hf_hub_download(repo_id, "nested/weights.bin", revision="feature/x", cache_dir=tmp_path / "c")
    assert Path(weights).read_bytes() == (src / "nested" / "weights.bin").read_bytes()

    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "feature/x": first.oid}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first.oid)]
    assert refs.converts == []

    info = api.model_info(repo_id, revision="v1", files_metadata=True)
    assert info.sha == first.oid
    files = {s.rfilename: s for s in info.siblings}
    assert set(files) == {".gitattributes", "config.json", "nested/weights.bin"}
    assert files["nested/weights.bin"].size == 5000
    weights_sha = hashlib.sha256((src / "nested/weights.bin").read_bytes()).hexdigest()
    assert files["nested/weights.bin"].lfs.sha256 == weights_sha
    assert files["config.json"].lfs is None
    assert api.model_info(repo_id).sha == second.oid

    snap = Path(snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "snap"))
    assert snap.name == first.oid
    assert (snap / "nested" / "weights.bin").read_bytes() == (src / "nested" / "weights.bin").read_bytes()
    assert api.file_exists(repo_id, "nested/weights.bin") and not api.file_exists(repo_id, "nope.txt")

    api.delete_branch(repo_id, branch="feature/x")
    api.delete_tag(repo_id, tag="v1")
    refs = api.list_repo_refs(repo_id)
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="v1")
    with pytest.raises(HfHubHTTPError):
        api.delete_branch(repo_id, branch="main")
    assert api.model_info(repo_id, revision=first.oid).sha == first.oid  # old commits stay reachable by sha


def test_create_commit_additions_deletions_and_parent_check(hub, api):
    repo_id = _repo()
    api.create_repo(repo_id)
    blob = b"\0" + os.urandom(4096)
    base = api.create_commit(repo_id, commit_message="seed", operations=[
        CommitOperationAdd("keep.txt", b"keep"),
        CommitOperationAdd("old/a.txt", b"a"),
        CommitOperationAdd("old/b.txt", b"b"),
        CommitOperationAdd("gone.txt", b"gone"),
    ])
    mixed = api.create_commit(repo_id, commit_message="mixed", parent_commit=base.oid, operations=[
        CommitOperationAdd("extra/a.txt", b"aaa"),
        CommitOperationAdd("extra/w.raw", blob),
        CommitOperationDelete("gone.txt"),
        CommitOperationDelete("old/"),
    ])
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "extra/a.txt", "extra/w.raw", "keep.txt"]
    infos = {i.path: i for i in api.get_paths_info(repo_id, ["extra/w.raw", "extra/a.txt", "extra", "missing"])}
    assert set(infos) == {"extra/w.raw", "extra/a.txt", "extra"}
    assert infos["extra/w.raw"].lfs.sha256 == hashlib.sha256(blob).hexdigest()
    assert infos["extra/w.raw"].size == len(blob)
    assert infos["extra/a.txt"].lfs is None
    assert infos["extra/a.txt"].blob_id == hashlib.sha1(b"blob 3\0aaa").hexdigest()
    with pytest.raises(HfHubHTTPError) as err:  # stale parentCommit
        api.create_commit(repo_id, commit_message="late", parent_commit=base.oid,
                          operations=[CommitOperationAdd("late.txt", b"late")])
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, commit_message="x", operations=[CommitOperationDelete("never-existed.txt")])
    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [mixed.oid, base.oid]
    assert [c.title for c in commits] == ["mixed", "seed", "initial commit"]
    assert commits[0].authors == ["alice"]


def test_pull_request_commit(hub, api, tmp_path):
    repo_id = _repo()
    api.create_repo(repo_id)
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and pr.pr_revision == "refs/pr/1"
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [p.target_commit for p in refs.pull_requests] == [pr.oid]
    assert Path(hf_hub_download(repo_id, "pr.txt", revision="refs/pr/1", cache_dir=tmp_path)).read_bytes() == b"pr"
    assert not api.file_exists(repo_id, "pr.txt")


def test_tree_pagination_expand_orgs_and_quiet_logging(small_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hubtune.localhub")
    api = HfApi(endpoint=small_hub.url, token="tok-alice-write")
    repo_id = _repo("team")  # alice writes to her org's namespace
    api.create_repo(repo_id)
    ops = [CommitOperationAdd(f"d{i % 2}/f{i}.txt", f"{i}".encode()) for i in range(5)]
    api.create_commit(repo_id, operations=ops + [CommitOperationAdd("w.bin", os.urandom(300))], commit_message="c")
    mark = small_hub.request_count
    files = api.list_repo_files(repo_id)
    assert sorted(files) == sorted([".gitattributes", "w.bin"] + [op.path_in_repo for op in ops])
    tree_calls = [r for r in small_hub.requests_since(mark) if r.method == "GET" and "/tree/" in r.path]
    assert len(tree_calls) == 5  # 2 dirs + 7 files at 2 per page
    entries = list(api.list_repo_tree(repo_id, path_in_repo="d0", expand=True))
    assert [e.path for e in entries] == ["d0/f0.txt", "d0/f2.txt", "d0/f4.txt"]
    assert entries[0].last_commit.title == "c"
    top = list(api.list_repo_tree(repo_id))
    assert [e.path for e in top] == ["d0", "d1", ".gitattributes", "w.bin"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="nope"))
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=small_hub.url, token="tok-bob-write").create_repo(_repo("team"))
    assert err.value.response.status_code == 403
    assert caplog.records, "quiet=False should log requests"
    for secret in TOKENS:
        assert secret not in caplog.text
    assert "sig=" not in caplog.text and "nonce=" not in caplog.text


def test_range_requests_and_resume(hub, api, tmp_path):
    repo_id = _repo()
    api.create_repo(repo_id)
    data = os.urandom(3000)
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=repo_id)
    url = f"{hub.url}/{repo_id}/resolve/main/blob.bin"
    status, headers, body = _raw("GET", url, {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], "bytes 10-19/3000")
    status, headers, body = _raw("GET", url, {"Range": "bytes=-100"})
    assert (status, body) == (206, data[-100:])
    status, headers, _ = _raw("GET", url, {"Range": "bytes=3000-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */3000")
    status, headers, _ = _raw("HEAD", url)
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"' and headers["Content-Length"] == "3000"
    assert len(headers["X-Repo-Commit"]) == 40 and "X-Xet-Hash" not in headers
    # The client's resume path: http_get with resume_size sends `Range: bytes=N-` and appends.
    part = tmp_path / "part"
    part.write_bytes(data[:1000])
    mark = hub.request_count
    with open(part, "ab") as f:
        http_get(url, f, resume_size=1000, expected_size=len(data))
    assert part.read_bytes() == data
    # Recorded before the answer went out, so it is there as soon as the client has the bytes.
    assert hub.requests_since(mark) == [("GET", f"/{repo_id}/resolve/main/blob.bin", 206, "bytes=1000-")]
    with HfFileSystem(endpoint=hub.url, skip_instance_cache=True).open(f"{repo_id}/blob.bin", "rb") as f:
        f.seek(2500)
        assert f.read(100) == data[2500:2600]


def test_special_characters_in_paths_round_trip(hub, api, tmp_path):
    repo_id = _repo()
    api.create_repo(repo_id)
    names = ["dir with space/ünïcødé 文件.txt", "hash#tag.txt", "plus+sign.txt", "per%25cent%.txt", "q?mark.txt"]
    api.create_commit(repo_id, commit_message="odd names",
                      operations=[CommitOperationAdd(n, n.encode()) for n in names])
    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *names])
    for name in names:
        assert Path(hf_hub_download(repo_id, name, cache_dir=tmp_path)).read_bytes() == name.encode()
    assert sorted(i.path for i in api.get_paths_info(repo_id, names)) == sorted(names)
    assert [e.path for e in api.list_repo_tree(repo_id, "dir with space")] == [names[0]]


def test_error_mapping(hub, api, tmp_path):
    repo_id = _repo()
    api.create_repo(repo_id)
    anon, reader = HfApi(endpoint=hub.url, token=False), HfApi(endpoint=hub.url, token="tok-alice-read")
    bob = HfApi(endpoint=hub.url, token="tok-bob-write")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "x.txt", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/does-not-exist")
    assert not api.repo_exists("alice/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0123456")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)
    for client, status in ((anon, 401), (reader, 403)):
        with pytest.raises(HfHubHTTPError) as err:
            client.create_repo(_repo())
        assert err.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as err:
            client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        assert err.value.response.status_code == status and not isinstance(err.value, RepositoryNotFoundError)
    assert anon.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # falls back to repo_info on 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(_repo("bob"))
    assert err.value.response.status_code == 403
    bob_repo = bob.create_repo(_repo("bob")).repo_id
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=bob_repo)
    assert err.value.response.status_code == 403 and "namespace 'bob'" in str(err.value)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="tok-unknown").whoami()
    assert err.value.response.status_code == 401

    private = api.create_repo(_repo(), private=True).repo_id
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=private)
    for client in (anon, bob):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info(private)
        assert not client.repo_exists(private)
        with pytest.raises(RepositoryNotFoundError):
            client.list_repo_files(private)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private, "s.txt", token=False, cache_dir=tmp_path)
    assert reader.model_info(private).private
    downloaded = hf_hub_download(private, "s.txt", token="tok-alice-read", cache_dir=tmp_path)
    assert Path(downloaded).read_bytes() == b"secret"
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=private)
    assert isinstance(err.value, RepositoryNotFoundError)


def test_headers_xet_route_and_host_based_urls(hub, hub_token):
    repo_id = _repo()
    auth = {"Authorization": f"Bearer {hub_token}"}
    status, headers, body = _raw("POST", f"{hub.url}/api/repos/create",
                                 {**auth, "Host": "localhost:1234", "X-Request-Id": "req-42",
                                  "Content-Type": "application/json"},
                                 json.dumps({"name": repo_id.split("/")[1], "organization": "alice"}).encode())
    assert status == 200 and json.loads(body)["url"] == f"http://localhost:1234/{repo_id}"
    assert headers["X-Request-Id"] == "req-42"
    start = time.monotonic()
    status, headers, body = _raw("GET", f"{hub.url}/api/models/{repo_id}/xet-read-token/main", auth)
    assert status == 404 and "HF_HUB_DISABLE_XET=1" in headers["X-Error-Message"]
    assert time.monotonic() - start < 5
    status, headers, _ = _raw("GET", f"{hub.url}/api/models/{repo_id}/xet-write-token/main", auth)
    assert status == 404 and "HF_HUB_DISABLE_XET=1" in json.loads(_)["error"]


def test_identical_files_are_stored_once(hub, api):
    content = b"\0same bytes " + os.urandom(64)
    for repo_id in (_repo(), _repo()):
        api.create_repo(repo_id)
        api.create_commit(repo_id, commit_message="dup", operations=[
            CommitOperationAdd("a.bin", content), CommitOperationAdd("copy/b.bin", content)])
    sha = hashlib.sha256(content).hexdigest()
    stored = [p for p in (hub.root / "objects").rglob("*") if p.is_file() and p.read_bytes() == content]
    assert stored == [hub.store.object_path(sha)]


def test_restart_serves_same_commits(tmp_path):
    root = tmp_path / "root"
    with LocalHub(root, tokens=TOKENS) as first:
        api = HfApi(endpoint=first.url, token="tok-alice-write")
        repo_id = _repo()
        api.create_repo(repo_id, private=True)
        one = api.upload_file(path_or_fileobj=b"one", path_in_repo="f.txt", repo_id=repo_id)
        api.create_tag(repo_id, tag="v1")
        two = api.upload_file(path_or_fileobj=b"two", path_in_repo="f.txt", repo_id=repo_id)
        before = (api.model_info(repo_id), api.list_repo_refs(repo_id), api.list_repo_commits(repo_id))
        port = first.port
    with LocalHub(root, port=port, tokens=TOKENS) as second:  # same root, same port
        api = HfApi(endpoint=second.url, token="tok-alice-write")
        info, refs, commits = api.model_info(repo_id), api.list_repo_refs(repo_id), api.list_repo_commits(repo_id)
        assert (info.sha, info.private) == (before[0].sha, True) == (two.oid, True)
        assert refs == before[1] and [c.commit_id for c in commits] == [c.commit_id for c in before[2]]
        for rev, want in ((one.oid[:7], b"one"), ("v1", b"one"), ("main", b"two")):
            path = hf_hub_download(repo_id, "f.txt", revision=rev, endpoint=second.url, token="tok-alice-write",
                                   cache_dir=tmp_path / "cache")
            assert Path(path).read_bytes() == want


def test_concurrent_commits_to_one_repo(hub, api):
    repo_id = _repo()
    api.create_repo(repo_id)
    results: list[str] = []
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            data = (b"\0" if i % 2 else b"") + f"payload {i}".encode()
            info = HfApi(endpoint=hub.url, token="tok-alice-write").upload_file(
                path_or_fileobj=data, path_in_repo=f"c/{i}.bin", repo_id=repo_id, commit_message=f"c{i}")
            results.append(info.oid)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an upload hung"  # else results/errors may still change
    assert not errors
    commits = api.list_repo_commits(repo_id)
    assert len(commits) == 9 and set(results) <= {c.commit_id for c in commits}
    chain = list(hub.store.history("model", repo_id, commits[0].commit_id))
    assert [c["id"] for c in chain] == [c.commit_id for c in commits]
    assert all(c["parent"] == p["id"] for c, p in zip(chain, chain[1:]))
    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes"] + [f"c/{i}.bin" for i in range(8)])


def test_timm_model_round_trip(hub, api, tmp_path):
    import timm
    from timm.models import save_for_hf

    repo_id = _repo(prefix="resnet")
    model = timm.create_model("test_resnet", num_classes=3).eval()
    save_for_hf(model, tmp_path / "model")
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "model")
    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert loaded.num_classes == 3


def test_dataset_parquet_and_imagefolder_streaming(hub, api, hub_token, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)  # restored after the test
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=["cat", "dog"])})
    images = [Image.open(io.BytesIO(_png(i))) for i in range(6)]
    parquet_repo = _repo(prefix="cats")
    datasets.Dataset.from_dict({"image": images, "labels": [0, 1, 0, 1, 1, 0]}, features=features).push_to_hub(
        parquet_repo, token=hub_token)
    stream = datasets.load_dataset(parquet_repo, split="train", streaming=True)
    assert stream.features == features
    rows = list(stream)
    assert [r["labels"] for r in rows] == [0, 1, 0, 1, 1, 0] and rows[0]["image"].size == (16, 16)
    info = api.dataset_info(parquet_repo, files_metadata=True)
    parquet = [s for s in info.siblings if s.rfilename.endswith(".parquet")]
    assert len(parquet) == 1 and parquet[0].lfs is not None and parquet[0].size == parquet[0].lfs.size > 0
    assert api.dataset_info(parquet_repo, revision=info.sha[:7]).sha == info.sha
    assert info.card_data["dataset_info"]["features"]  # README written by push_to_hub, parsed into cardData

    folder_repo = _repo(prefix="imagefolder")
    for label in ("cat", "dog"):
        (tmp_path / "imf" / "train" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imf" / "train" / label / f"{label}_{i}.png").write_bytes(_png(10 + i))
    api.create_repo(folder_repo, repo_type="dataset")
    api.upload_folder(repo_id=folder_repo, repo_type="dataset", folder_path=tmp_path / "imf")
    stream = datasets.load_dataset(folder_repo, split="train", streaming=True)
    assert stream.features["label"].names == ["cat", "dog"]
    assert sorted(r["label"] for r in stream) == [0, 0, 1, 1]


def test_model_card_push_load_and_yaml_validation(hub, api, hub_token):
    repo_id = _repo(prefix="card")
    api.create_repo(repo_id)
    text = "---\nlicense: mit\nlibrary_name: timm\ntags:\n- image-classification\n---\n\n# Tiny model\n"
    ModelCard(text).push_to_hub(repo_id, token=hub_token)
    card = ModelCard.load(repo_id)
    assert card.data.license == "mit" and "# Tiny model" in card.text
    info = api.model_info(repo_id)
    assert info.card_data["library_name"] == "timm" and info.library_name == "timm"
    assert info.tags == ["image-classification"]
    for bad, why in (("---\nlicense: [mit\n---\n", "Invalid YAML"), ("---\n- a\n- b\n---\n", "mapping")):
        with pytest.raises(ValueError, match=why):
            api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id=repo_id)
        status, _, body = _raw("POST", f"{hub.url}/api/validate-yaml", {"Content-Type": "application/json"},
                               json.dumps({"content": bad, "repoType": "model"}).encode())
        assert status == 400 and why in json.loads(body)["errors"][0]["message"]


class _Served:
    """`hub serve` in a subprocess; a thread moves its stdout lines to a queue so that every read can time out."""

    def __init__(self, entry: list[str], args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        self.proc = subprocess.Popen([sys.executable, *entry, *args], cwd=REPO_ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def value(self, prefix: str, timeout: float = 30) -> str:
        """The value of the first `export NAME=value` line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"exited before printing {prefix!r}; stdout={self.output!r}"
            self.output.append(line)
            if line.startswith(prefix):
                return line.rstrip("\n").split("=", 1)[1]

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, then (exit code, stderr); `output` then holds all of stdout."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=20)
        while (line := self.lines.get(timeout=10)) is not None:  # the process has exited: stdout is at EOF
            self.output.append(line)
        self.pump.join(timeout=10)
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        """Make sure the process and the pump thread are gone (after a failed test too)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.pump.join(timeout=10)  # the process is gone, so the pump reaches EOF
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.mark.parametrize("entry", [["-m", "hubtune.localhub"], ["-m", "hubtune.cli", "hub", "serve"]],
                         ids=["module", "hubtune-hub-serve"])
def test_cli_serve_subprocess(entry, tmp_path):
    served = _Served(entry, ["--root", str(tmp_path / "root"), "--port", "0", "--print-token",
                             "--token", "carol=tok-carol:write", "--token", "dave=tok-dave:read"])
    try:
        endpoint = served.value("export HF_ENDPOINT=")
        assert served.value("export HF_TOKEN=") == "tok-carol"  # --print-token: the first write token only
        assert HfApi(endpoint=endpoint, token="tok-carol").whoami()["name"] == "carol"
        assert HfApi(endpoint=endpoint, token="tok-carol").create_repo("carol/cli").repo_id == "carol/cli"
        code, stderr = served.stop()
    finally:
        served.kill()
    assert code == 0
    assert "export HF_HUB_DISABLE_XET=1\n" in served.output and "export HF_TOKEN=tok-carol\n" in served.output
    assert "tok-carol" not in stderr and "tok-dave" not in "".join(served.output) + stderr


def test_serve_banner_prints_no_token_unless_it_made_one(tmp_path):
    served = _Served(["-m", "hubtune.localhub"], ["--root", str(tmp_path / "a"), "--port", "0",
                                                  "--token", "carol=tok-carol"])
    try:
        served.value("export HF_ENDPOINT=")
        code, stderr = served.stop()
    finally:
        served.kill()
    out = "".join(served.output)
    assert code == 0 and "tok-carol" not in out + stderr
    assert not [line for line in served.output if line.startswith("export HF_TOKEN")]
    assert "--print-token" in out  # says how to get one
    # No --token at all: one write token is generated for --user and printed, so the Hub can be pushed to.
    served = _Served(["-m", "hubtune.localhub"], ["--root", str(tmp_path / "b"), "--port", "0", "--user", "erin"])
    try:
        endpoint, token = served.value("export HF_ENDPOINT="), served.value("export HF_TOKEN=")
        api = HfApi(endpoint=endpoint, token=token)
        me = api.whoami()
        assert (me["name"], me["auth"]["accessToken"]["role"]) == ("erin", "write")
        api.create_repo("erin/pushed")
        api.upload_file(path_or_fileobj=b"\0weights", path_in_repo="w.bin", repo_id="erin/pushed")
        assert served.stop()[0] == 0
    finally:
        served.kill()
    assert len(token) >= 32 and "".join(served.output).count(token) == 1


def test_serve_on_a_busy_port_fails_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "hubtune.localhub", "--root", str(tmp_path / "root"),
                                 "--port", str(port)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0] and "--port 0" in lines[0]


def test_lfs_upload_href_is_signed_single_use_and_atomic(hub, api, hub_token):
    repo_id = _repo()
    api.create_repo(repo_id)
    auth = {"Authorization": f"Bearer {hub_token}", "Content-Type": "application/json"}
    data = os.urandom(2000)
    oid = hashlib.sha256(data).hexdigest()

    def batch() -> dict:
        body = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
        url = f"{hub.url}/{repo_id}.git/info/lfs/objects/batch"
        status, _, raw = _raw("POST", url, auth, json.dumps(body).encode())
        assert status == 200
        return json.loads(raw)["objects"][0]

    href = batch()["actions"]["upload"]["href"]
    assert href.startswith(hub.url) and "sig=" in href
    assert _raw("PUT", href.replace("sig=", "sig=0"), data=data)[0] == 403  # tampered signature
    assert _raw("PUT", href, data=os.urandom(2000))[0] == 400  # content does not match the oid
    assert not hub.store.has_object(oid) and not any((hub.root / "tmp").iterdir())
    # A connection dropped mid-upload leaves nothing visible, not even in the staging area.
    host, port = hub.url.removeprefix("http://").split(":")
    target = href.removeprefix(hub.url)
    mark = hub.request_count
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        sock.sendall(data[:700])
    # The server records the PUT after it has removed the partial file (and before any answer).
    hub.wait_for_request(lambda r: r.method == "PUT" and r.path == target.split("?")[0], since=mark)
    assert not hub.store.has_object(oid) and not any((hub.root / "tmp").iterdir())
    assert _raw("PUT", href, data=data)[0] == 200
    assert _raw("PUT", href, data=data)[0] == 403  # single use
    assert hub.store.has_object(oid, len(data)) and "actions" not in batch()  # stored: client skips the upload
    ndjson = b"\n".join(json.dumps(line).encode() for line in (
        {"key": "header", "value": {"summary": "lfs"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}))
    status, _, body = _raw("POST", f"{hub.url}/api/models/{repo_id}/commit/main",
                           {**auth, "Content-Type": "application/x-ndjson"}, ndjson)
    assert status == 400 and "was not uploaded" in json.loads(body)["error"]
    with pytest.raises(HfHubHTTPError) as err:  # a file where a folder exists
        api.create_commit(repo_id, commit_message="clash", operations=[
            CommitOperationAdd("x/y.txt", b"1"), CommitOperationAdd("x", b"2")])
    assert err.value.response.status_code == 400


def _commit_by_oid(hub, token: str, repo_id: str, path: str, oid: str, size: int | None) -> httpx2.Response:
    """A raw NDJSON commit naming an LFS object by oid without uploading it (size None: the copy form)."""
    value = {"path": path, "algo": "sha256", "oid": oid, **({"size": size} if size is not None else {})}
    body = "\n".join(json.dumps(line) for line in ({"key": "header", "value": {"summary": "by oid"}},
                                                   {"key": "lfsFile", "value": value}))
    return httpx2.post(f"{hub.url}/api/models/{repo_id}/commit/main", content=body.encode(), timeout=30,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})


def _batch(hub, token: str, repo_id: str, oid: str, size: int) -> dict:
    """The LFS batch answer for one object."""
    body = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}],
            "hash_algo": "sha256"}
    response = httpx2.post(f"{hub.url}/{repo_id}.git/info/lfs/objects/batch", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.git-lfs+json"})
    assert response.status_code == 200, response.text
    return response.json()["objects"][0]


def test_private_objects_do_not_leak_through_dedup(hub, api):
    secret = b"\0alice's private weights " + os.urandom(512)
    oid, size = hashlib.sha256(secret).hexdigest(), len(secret)
    private = api.create_repo(_repo(), private=True).repo_id
    api.upload_file(path_or_fileobj=secret, path_in_repo="secret.bin", repo_id=private)
    assert hub.store.has_object(oid, size)
    bob = HfApi(endpoint=hub.url, token="tok-bob-write")
    bob_repo = bob.create_repo(_repo("bob")).repo_id

    # The attack: commit alice's object into bob's public repo by its sha256, with or without a size (the second
    # is the form of a server-side copy). The answer is the one for an object that exists nowhere.
    for known_size in (size, None):
        stolen = _commit_by_oid(hub, "tok-bob-write", bob_repo, "stolen.bin", oid, known_size)
        assert stolen.status_code == 400 and "was not uploaded" in stolen.json()["error"]
    unknown = _commit_by_oid(hub, "tok-bob-write", bob_repo, "stolen.bin", "0" * 64, size)
    assert unknown.json()["error"].replace("0" * 64, oid) == stolen.json()["error"]
    assert "stolen.bin" not in bob.list_repo_files(bob_repo)
    # Nor does the batch endpoint say "present": bob gets an upload action, as for unknown content.
    assert "upload" in _batch(hub, "tok-bob-write", bob_repo, oid, size)["actions"]
    # Branch and tag starting points are revisions of the repo itself: alice's commit means nothing there.
    alice_head = api.model_info(private).sha
    with pytest.raises(RevisionNotFoundError):
        bob.create_branch(bob_repo, branch="b", revision=alice_head)
    with pytest.raises(RevisionNotFoundError):
        bob.create_tag(bob_repo, tag="t", revision=alice_head)

    # An upload URL is signed for one repo: moved to bob's repo it is refused, and bob's repo gains nothing.
    href = _batch(hub, "tok-alice-write", private, hashlib.sha256(b"new").hexdigest(), 3)["actions"]["upload"]["href"]
    forged = href.replace(f"/{private}.git/", f"/{bob_repo}.git/")
    assert forged != href and httpx2.put(forged, content=b"new", timeout=30).status_code == 403
    assert not hub.store.holds("model", bob_repo, hashlib.sha256(b"new").hexdigest())

    # Uploading the bytes proves possession: bob may then commit them, and the content is still stored once.
    bob.upload_file(path_or_fileobj=secret, path_in_repo="mine.bin", repo_id=bob_repo)
    assert "mine.bin" in bob.list_repo_files(bob_repo)
    assert [p for p in (hub.root / "objects").rglob("*") if p.is_file() and p.read_bytes() == secret] == [
        hub.store.object_path(oid)]


def test_owner_reuses_objects_of_her_other_repos_without_uploading(hub, api):
    blob = b"\0shared " + os.urandom(512)
    oid, size = hashlib.sha256(blob).hexdigest(), len(blob)
    first = api.create_repo(_repo(), private=True).repo_id
    api.upload_file(path_or_fileobj=blob, path_in_repo="w.bin", repo_id=first)
    second = api.create_repo(_repo(), private=True).repo_id
    assert "actions" not in _batch(hub, "tok-alice-write", second, oid, size)  # she can read `first`
    assert _commit_by_oid(hub, "tok-alice-write", second, "by-oid.bin", oid, size).status_code == 200
    third = api.create_repo(_repo()).repo_id
    mark = hub.request_count
    api.upload_file(path_or_fileobj=blob, path_in_repo="again.bin", repo_id=third)
    assert not [r for r in hub.requests_since(mark) if r.method == "PUT"]  # dedup: the client skipped the upload
    api.create_commit(third, commit_message="copy", operations=[CommitOperationCopy("again.bin", "copy/again.bin")])
    assert {"again.bin", "copy/again.bin"} <= set(api.list_repo_files(third))


def test_holder_index_is_built_for_a_root_from_before_it_existed(tmp_path):
    with LocalHub(tmp_path / "root", tokens=TOKENS) as server:
        api = HfApi(endpoint=server.url, token="tok-alice-write")
        repo_id = api.create_repo(_repo(), private=True).repo_id
        api.upload_file(path_or_fileobj=b"\0old", path_in_repo="old.bin", repo_id=repo_id)
    oid = hashlib.sha256(b"\0old").hexdigest()
    shutil.rmtree(tmp_path / "root" / "holders")  # what an older hubtune left behind
    with LocalHub(tmp_path / "root", tokens=TOKENS) as server:
        assert server.store.holds("model", repo_id, oid) and server.store.holders(oid) == [("model", repo_id)]


def test_start_removes_partial_uploads_left_by_a_killed_server(tmp_path):
    root = tmp_path / "root"
    staging = root / "tmp"
    with LocalHub(root, tokens=TOKENS) as first:
        stale, fresh = staging / "upload-stale", staging / "upload-fresh"
        stale.write_bytes(b"part of an upload")
        fresh.write_bytes(b"maybe an upload `first` is receiving")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        with LocalHub(root, tokens=TOKENS):  # a second server on a root in use removes only stale files
            assert not stale.exists() and fresh.exists()
        assert HfApi(endpoint=first.url, token="tok-alice-write").whoami()["name"] == "alice"
    with LocalHub(root, tokens=TOKENS):  # alone on the root: whatever is staged was left by a stopped server
        assert not any(staging.iterdir())


def test_request_log_window_refuses_dropped_entries(tmp_path):
    with LocalHub(tmp_path / "root", request_log_size=3) as server:
        api = HfApi(endpoint=server.url, token=False)
        mark = server.request_count
        assert not api.repo_exists("alice/none") and not api.repo_exists("alice/none")
        assert [(r.method, r.status) for r in server.requests_since(mark)] == [("GET", 404)] * 2
        assert not api.repo_exists("alice/none") and not api.repo_exists("alice/none")
        with pytest.raises(LookupError, match="1 of the 4 requests since mark"):
            server.requests_since(mark)
        assert server.requests_since(server.request_count) == [] and server.request_count == mark + 4
