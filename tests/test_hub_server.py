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

import numpy as np
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
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

from hubtune.hub_server import LocalHub

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
    caplog.set_level(logging.INFO, logger="hubtune.hub_server")
    api = HfApi(endpoint=small_hub.url, token="tok-alice-write")
    repo_id = _repo("team")  # alice writes to her org's namespace
    api.create_repo(repo_id)
    ops = [CommitOperationAdd(f"d{i % 2}/f{i}.txt", f"{i}".encode()) for i in range(5)]
    api.create_commit(repo_id, operations=ops + [CommitOperationAdd("w.bin", os.urandom(300))], commit_message="c")
    files = api.list_repo_files(repo_id)
    assert sorted(files) == sorted([".gitattributes", "w.bin"] + [op.path_in_repo for op in ops])
    tree_calls = [r for r in small_hub.requests if r[0] == "GET" and "/tree/" in r[1]]
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
    with open(part, "ab") as f:
        http_get(url, f, resume_size=1000, expected_size=len(data))
    assert part.read_bytes() == data
    assert ("GET", f"/{repo_id}/resolve/main/blob.bin", 206, "bytes=1000-") in hub.requests
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


def test_dataset_parquet_and_imagefolder_streaming(hub, api, hub_token, tmp_path):
    import datasets

    datasets.config.USE_PARQUET_EXPORT = False
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


@pytest.mark.parametrize("entry", [["-m", "hubtune.hub_server"], ["-m", "hubtune.cli", "hub", "serve"]],
                         ids=["module", "hubtune-hub-serve"])
def test_cli_serve_subprocess(entry, tmp_path):
    cmd = [sys.executable, *entry, "--root", str(tmp_path / "root"), "--port", "0",
           "--token", "carol=tok-carol:write", "--token", "dave=tok-dave:read"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline, endpoint, output = time.monotonic() + 30, None, []
        while endpoint is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            output.append(line)
            if line.startswith("export HF_ENDPOINT="):
                endpoint = output[-1].strip().split("=", 1)[1]
        assert endpoint, f"no HF_ENDPOINT line; stdout={output!r}"
        assert HfApi(endpoint=endpoint, token="tok-carol").whoami()["name"] == "carol"
        assert HfApi(endpoint=endpoint, token="tok-carol").create_repo("carol/cli").repo_id == "carol/cli"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        while (line := lines.get(timeout=10)) is not None:  # the process has exited: stdout is at EOF
            output.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "export HF_HUB_DISABLE_XET=1\n" in output and "export HF_TOKEN=tok-carol\n" in output
    assert "tok-carol" not in proc.stderr.read()


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
    assert not hub.store.has_object(oid)
    # A connection dropped mid-upload leaves nothing visible.
    host, port = hub.url.removeprefix("http://").split(":")
    target = href.removeprefix(hub.url)

    def put_count() -> int:
        return sum(r[0] == "PUT" and r[1] == target.split("?")[0] for r in list(hub.requests))

    before = put_count()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        sock.sendall(data[:700])
    deadline = time.monotonic() + 10
    while put_count() == before:
        assert time.monotonic() < deadline, "server never finished the interrupted PUT"
        time.sleep(0.01)
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
