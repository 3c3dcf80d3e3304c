"""The fault-injecting proxy (tests/faultproxy.py) between the real huggingface_hub client and the local Hub."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
from pathlib import Path

import httpx2
import pytest
from faultproxy import FaultProxy
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

TOKEN = "tok-alice-write"


@pytest.fixture
def proxy(hub):
    with FaultProxy(hub.url, timeout=10) as p:
        yield p
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]
    assert not p.errors, p.errors


@pytest.fixture
def repo_id(hub) -> str:
    repo = f"alice/proxied-{uuid.uuid4().hex[:10]}"
    HfApi(endpoint=hub.url, token=TOKEN).create_repo(repo)
    return repo


def _in_thread(fn) -> tuple[threading.Thread, queue.Queue]:
    """Run ``fn`` in a thread; its result or exception arrives in the queue."""
    out: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            out.put(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the test through the queue
            out.put(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_upload_and_download_pass_through_unchanged(hub, proxy, repo_id, tmp_path):
    api = HfApi(endpoint=proxy.url, token=TOKEN)
    weights = b"\0" + os.urandom(300_000)  # LFS: batch, then a PUT to an href the hub built from the proxy's Host
    puts = proxy.count("PUT", r"\.git/info/lfs/objects/upload/")
    seen = proxy.count("*", r"")
    api.upload_file(path_or_fileobj=weights, path_in_repo="w.bin", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes/hello.txt", repo_id=repo_id)
    assert puts.matched == 1 and seen.matched >= 6 and seen.applied == 0
    for name, content in (("w.bin", weights), ("notes/hello.txt", b"hello")):
        path = hf_hub_download(repo_id, name, endpoint=proxy.url, token=TOKEN, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == content
    url = f"/{repo_id}/resolve/main/w.bin"
    direct = httpx2.get(hub.url + url, headers={"Range": "bytes=100-199"}, timeout=10)
    proxied = httpx2.get(proxy.url + url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert (proxied.status_code, proxied.content) == (206, weights[100:200])
    for header in ("X-Repo-Commit", "ETag", "Content-Range", "Content-Length"):
        assert proxied.headers[header] == direct.headers[header], header
    assert proxied.headers["ETag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    # A chunked request body (a generator) is relayed as such.
    chunked = httpx2.post(f"{proxy.url}/api/validate-yaml", content=iter([b'{"content": ', b'"---\\na: 1\\n---\\n"}']),
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert chunked.status_code == 200 and chunked.json() == {"errors": [], "warnings": []}


def test_injected_status_is_retried_by_the_client_or_raised(proxy, repo_id):
    api = HfApi(endpoint=proxy.url, token=TOKEN)
    flaky_put = proxy.fail("PUT", r"/upload/", status=503)
    api.upload_file(path_or_fileobj=b"\0" + os.urandom(1000), path_in_repo="w.bin", repo_id=repo_id)
    assert (flaky_put.applied, flaky_put.matched) == (1, 2)  # http_backoff retried the PUT once
    flaky_info = proxy.fail("GET", rf"^/api/models/{repo_id}", status=500)
    with pytest.raises(HfHubHTTPError) as err:  # model_info has no retry
        api.model_info(repo_id)
    assert err.value.response.status_code == 500 and err.value.response.headers["X-Fault-Injected"] == "faultproxy"
    assert api.model_info(repo_id).id == repo_id and (flaky_info.applied, flaky_info.matched) == (1, 2)


def test_dropped_request_is_a_connection_error(proxy, repo_id):
    api = HfApi(endpoint=proxy.url, token=TOKEN)
    dropped = proxy.drop("GET", rf"^/api/models/{repo_id}")
    with pytest.raises(httpx2.TransportError):
        api.model_info(repo_id)
    assert dropped.applied == 1 and api.model_info(repo_id).id == repo_id


def test_held_request_waits_for_release_or_timeout(proxy, repo_id):
    api = HfApi(endpoint=proxy.url, token=TOKEN)
    stuck = proxy.hold("GET", rf"^/api/models/{repo_id}")
    thread, result = _in_thread(lambda: api.model_info(repo_id))
    assert stuck.holding.wait(10), "the request never reached the proxy"
    assert thread.is_alive() and result.empty()  # held: no answer yet
    stuck.release()
    thread.join(10)
    assert not thread.is_alive() and result.get_nowait().id == repo_id
    proxy.hold("GET", rf"^/api/models/{repo_id}", timeout=0.2)  # a hang that ends on its own
    assert api.model_info(repo_id).id == repo_id


def test_close_ends_its_threads_with_a_request_held(hub, repo_id):
    proxy = FaultProxy(hub.url, timeout=10)
    held = threading.Event()
    stuck = proxy.hold("GET", rf"^/api/models/{repo_id}", timeout=60, release=held)
    thread, result = _in_thread(lambda: HfApi(endpoint=proxy.url, token=TOKEN).model_info(repo_id))
    assert stuck.holding.wait(10)
    proxy.close()
    thread.join(10)
    assert not thread.is_alive() and isinstance(result.get_nowait(), httpx2.TransportError)
    assert held.is_set() and not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]
