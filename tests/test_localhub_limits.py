"""The local Hub's defences: bounded bodies, auth before bodies, many clients at once, malformed requests and ref
names, over real HTTP on 127.0.0.1 (the real huggingface_hub client where it applies; no mocks).

A request that declares a body and sends none proves an answer came before the body was read: a server that read
first would wait for it, and the client's socket timeout would end the test as a failure.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hubtune.localhub import BodyLimits, LocalHub

TOKENS = {"tok-alice-write": ("alice", "write"), "tok-alice-read": ("alice", "read")}
WRITE = {"Authorization": "Bearer tok-alice-write"}
REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = BodyLimits(form=1024, listing=4096, commit=64 << 10, commit_line=8192, upload=1 << 20)


def _ask(hub: LocalHub, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         raw_tail: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of one request on a fresh connection; only the headers given are sent.

    With ``body`` None nothing follows the headers, whatever Content-Length they declare; ``raw_tail`` is sent
    as is after them (hand-made chunked framing).
    """
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders(body)
        if raw_tail:
            conn.send(raw_tail)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else {}
    finally:
        conn.close()


def _ndjson(*lines: object) -> bytes:
    return b"\n".join(json.dumps(line).encode() for line in lines)


@pytest.fixture
def small_hub(tmp_path) -> Iterator[LocalHub]:
    """A server with tiny body limits (1 KiB forms, 4 KiB listings, 8 KiB NDJSON lines, 1 MiB uploads)."""
    with LocalHub(tmp_path / "root", tokens=TOKENS, limits=SMALL) as server:
        yield server


@pytest.fixture
def repo(small_hub) -> str:
    api = HfApi(endpoint=small_hub.url, token="tok-alice-write")
    return api.create_repo(f"alice/r-{uuid.uuid4().hex[:8]}").repo_id


@contextmanager
def _served(root: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m hubtune.localhub`` in a subprocess with alice's write token: (endpoint, process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.Popen([sys.executable, "-m", "hubtune.localhub", "--root", str(root), "--port", "0",
                             "--token", "alice=tok-alice-write", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        # The banner comes at once; a server that fails to start exits, which ends the lines.
        endpoint = next((line.strip().split("=", 1)[1] for line in proc.stdout
                         if line.startswith("export HF_ENDPOINT=")), None)
        assert endpoint, "the server exited before printing its endpoint"
        yield endpoint, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_a_body_over_its_endpoints_limit_gets_413_before_it_is_sent(small_hub, repo):
    api = f"/api/models/{repo}"
    json_head = {**WRITE, "Content-Type": "application/json"}
    for method, path, headers, limit in (
        ("POST", "/api/repos/create", json_head, SMALL.form),
        ("POST", f"{api}/preupload/main", json_head, SMALL.listing),
        ("POST", f"{api}/commit/main", {**WRITE, "Content-Type": "application/x-ndjson"}, SMALL.commit),
        ("POST", f"/{repo}.git/info/lfs/objects/batch", json_head, SMALL.listing),
        ("POST", "/api/validate-yaml", {"Content-Type": "application/json"}, SMALL.listing),  # anonymous by design
        ("PUT", f"/{repo}.git/info/lfs/objects/upload/{'a' * 64}?size=1", {}, SMALL.upload),
    ):
        status, _, body = _ask(small_hub, method, path, {**headers, "Content-Length": str(limit + 1)})
        assert status == 413, (path, body)
        assert f"is {limit + 1} bytes, over its limit of {limit} bytes" in body["error"]

    # A chunked body declares no length: the chunk that would cross the limit is refused before it is read.
    status, _, body = _ask(small_hub, "POST", f"{api}/commit/main", {**WRITE, "Transfer-Encoding": "chunked"},
                           raw_tail=b"%x\r\n" % (SMALL.commit + 1))
    assert status == 413 and "commit fewer regular files" in body["error"]
    # One NDJSON line is the most a commit holds in memory: a longer one is refused before its end is read.
    long_line = _ndjson({"key": "header", "value": {"summary": "x" * SMALL.commit_line}})
    status, _, body = _ask(small_hub, "POST", f"{api}/commit/main",
                           {**WRITE, "Content-Length": str(len(long_line))}, long_line)
    assert status == 413 and "line 1 of the body of POST commit" in body["error"]

    # An upload URL is signed for a size: a longer body is refused unread, though it is under the server's limit.
    data = b"\0" * 100
    oid = hashlib.sha256(data).hexdigest()
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode()
    status, _, body = _ask(small_hub, "POST", f"/{repo}.git/info/lfs/objects/batch",
                           {**json_head, "Content-Length": str(len(batch))}, batch)
    href = body["objects"][0]["actions"]["upload"]["href"].removeprefix(small_hub.url)
    status, _, body = _ask(small_hub, "PUT", href, {"Content-Length": str(len(data) + 1)})
    assert status == 413 and "the size its upload URL was signed for" in body["error"]
    assert _ask(small_hub, "PUT", href, {"Content-Length": str(len(data))}, data)[0] == 200  # the URL still works
    assert HfApi(endpoint=small_hub.url, token="tok-alice-write").list_repo_files(repo) == [".gitattributes"]


def test_writes_without_a_valid_write_token_are_refused_before_their_body_is_sent(small_hub, repo):
    api, lfs = f"/api/models/{repo}", f"/{repo}.git/info/lfs/objects"
    huge = {"Content-Length": str(10**12), "Content-Type": "application/json"}  # far over every limit, never sent
    routes = [("POST", "/api/repos/create"), ("POST", f"{api}/preupload/main"), ("POST", f"{api}/commit/main"),
              ("POST", f"{api}/branch/b"), ("POST", f"{api}/tag/main"), ("PUT", f"{api}/settings"),
              ("POST", f"{lfs}/batch"), ("POST", f"{lfs}/verify")]
    for method, path in routes:
        for auth, expected in ((None, 401), ("tok-unknown", 401), ("tok-alice-read", 403)):
            headers = {**huge, **({"Authorization": f"Bearer {auth}"} if auth else {})}
            status, response_headers, body = _ask(small_hub, method, path, headers)
            assert status == expected, (method, path, auth, body)
            assert response_headers["Connection"] == "close"  # its unread body ends the connection
    # The signed upload URL is its own credential: a forged signature is refused before the body is read.
    status, _, body = _ask(small_hub, "PUT", f"{lfs}/upload/{'a' * 64}?size=10&expires=9999999999&nonce=n&sig=00",
                           {"Content-Length": "10"})
    assert status == 403 and "signature is invalid" in body["error"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_the_real_client_streams_a_large_lfs_upload_to_disk(tmp_path):
    size, block = 64 << 20, os.urandom(1 << 20)
    big = tmp_path / "model.safetensors"
    with big.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    sha256 = hashlib.sha256(block * (size >> 20)).hexdigest()
    try:
        with _served(tmp_path / "root", "--max-upload-size", "100M") as (endpoint, proc):
            api = HfApi(endpoint=endpoint, token="tok-alice-write")
            repo_id = api.create_repo("alice/big").repo_id
            before = _peak_rss_bytes(proc.pid)
            api.upload_file(path_or_fileobj=str(big), path_in_repo=big.name, repo_id=repo_id)
            grown = _peak_rss_bytes(proc.pid) - before
            (entry,) = [f for f in api.model_info(repo_id, files_metadata=True).siblings if f.rfilename == big.name]
            assert (entry.lfs.sha256, entry.lfs.size) == (sha256, size)
            # Read whole, 64 MiB would cost the server well over 64 MiB; streamed, a few 1 MiB chunks.
            assert grown < 16 << 20, f"server peak RSS grew by {grown >> 20} MiB for a {size >> 20} MiB upload"
            # The same client is told, at the LFS batch step, when a file is over the server's --max-upload-size.
            over = tmp_path / "over.bin"
            with over.open("wb") as f:
                f.truncate((100 << 20) + 1)  # sparse: costs no disk
            with pytest.raises(ValueError, match="over the upload limit of 104857600 bytes.*--max-upload-size"):
                api.upload_file(path_or_fileobj=str(over), path_in_repo=over.name, repo_id=repo_id)
    finally:  # the machine's disk is shared: do not leave 128 MiB behind in pytest's kept temp dirs
        big.unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "root", ignore_errors=True)


def test_200_concurrent_clients_all_get_answers_without_resets(tmp_path):
    clients, request = 200, b"GET /api/whoami-v2 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok-alice-write\r\n\r\n"
    with LocalHub(tmp_path / "root", tokens=TOKENS) as hub:
        # All connect at once, from one thread, so that the burst is as sharp as the machine allows.
        sel, state = selectors.DefaultSelector(), {}
        try:
            for _ in range(clients):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", hub.port))
                state[sock] = {"start": time.monotonic(), "connect_s": None, "reply": b"", "error": None}
                sel.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 30
            while sel.get_map() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1):
                    sock, st = key.fileobj, state[key.fileobj]
                    if st["connect_s"] is None:
                        st["connect_s"] = time.monotonic() - st["start"]
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if not code:
                            sock.send(request)  # a few dozen bytes: the empty send buffer takes them at once
                            sel.modify(sock, selectors.EVENT_READ)
                            continue
                        st["error"] = os.strerror(code)
                    else:
                        try:
                            data = sock.recv(1 << 16)
                        except OSError as err:
                            data, st["error"] = b"", str(err)
                        st["reply"] += data
                        if b"\r\n\r\n" not in st["reply"]:
                            if data:
                                continue  # the head is not complete yet
                            st["error"] = st["error"] or "closed before answering"
                    sel.unregister(sock)
        finally:
            for sock in state:
                sock.close()
    results = list(state.values())
    assert [r["error"] for r in results if r["error"]] == []
    assert sum(r["reply"].startswith(b"HTTP/1.1 200 ") for r in results) == clients
    # A full listen backlog drops SYNs, which the kernel retries after 1 s: every connect must beat that.
    slowest = max(r["connect_s"] for r in results)
    assert slowest < 1.0, f"slowest connect took {slowest:.2f} s: the listen backlog overflowed"


MALFORMED = [  # (what, method, path, headers, body); {repo} is filled in
    ("Content-Length not a number", "POST", "/api/repos/create", {"Content-Length": "abc"}, b""),
    ("negative Content-Length", "POST", "/api/repos/create", {"Content-Length": "-5"}, b""),
    ("conflicting Content-Lengths", "POST", "/api/repos/create", {"Content-Length": "2", "content-length": "3"},
     b"{}"),
    ("Content-Length on a GET", "GET", "/api/whoami-v2", {"Content-Length": "1e3"}, b""),
    ("unsupported Transfer-Encoding", "POST", "/api/repos/create", {"Transfer-Encoding": "gzip"}, b""),
    ("chunk size not hex", "POST", "/api/repos/create", {"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n"),
    ("invalid JSON", "POST", "/api/repos/create", {}, b"{not json"),
    ("JSON that is not UTF-8", "POST", "/api/repos/create", {}, b'{"name": "\xff"}'),
    ("JSON nested too deep", "POST", "/api/repos/create", {}, b"[" * 50_000),
    ("JSON array for an object", "POST", "/api/repos/create", {}, b"[1, 2]"),
    ("name not a string", "POST", "/api/repos/create", {}, b'{"name": 5}'),
    ("private not a boolean", "POST", "/api/repos/create", {}, b'{"name": "x", "private": "yes"}'),
    ("files not a list", "POST", "/api/models/{repo}/preupload/main", {}, b'{"files": "a.txt"}'),
    ("file entry without path", "POST", "/api/models/{repo}/preupload/main", {}, b'{"files": [{"size": 1}]}'),
    ("sample not base64", "POST", "/api/models/{repo}/preupload/main", {},
     b'{"files": [{"path": "a", "size": 1, "sample": "!!"}]}'),
    ("LFS objects not a list", "POST", "/{repo}.git/info/lfs/objects/batch", {},
     b'{"operation": "upload", "objects": 1}'),
    ("LFS verify size not a number", "POST", "/{repo}.git/info/lfs/objects/verify", {},
     b'{"oid": "' + b"a" * 64 + b'", "size": "big"}'),
    ("branch startingPoint not a string", "POST", "/api/models/{repo}/branch/b", {}, b'{"startingPoint": 1}'),
    ("settings body null", "PUT", "/api/models/{repo}/settings", {}, b"null"),
    ("paths-info form not UTF-8", "POST", "/api/models/{repo}/paths-info/main",
     {"Content-Type": "application/x-www-form-urlencoded"}, b"paths=\xff"),
    ("tree cursor not a number", "GET", "/api/models/{repo}/tree/main?cursor=abc", {}, b""),
    ("upload size not a number", "PUT", "/{repo}.git/info/lfs/objects/upload/" + "a" * 64 + "?size=abc", {}, b""),
    ("NDJSON line not JSON", "POST", "/api/models/{repo}/commit/main", {}, b"{oops\n"),
    ("NDJSON without a header", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "file", "value": {"path": "a", "content": "x"}})),
    ("NDJSON header value not an object", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "header", "value": "s"})),
    ("NDJSON line an array", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "header", "value": {}}, [1])),
    ("NDJSON line without key", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "header", "value": {}}, {"value": {"path": "a"}})),
    ("NDJSON file content not base64", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "header", "value": {}}, {"key": "file", "value": {"path": "a", "content": "%%",
                                                                       "encoding": "base64"}})),
    ("NDJSON LFS size not a number", "POST", "/api/models/{repo}/commit/main", {},
     _ndjson({"key": "header", "value": {}}, {"key": "lfsFile", "value": {"path": "a", "oid": "a" * 64,
                                                                          "size": "1"}})),
]


def test_a_client_that_resets_mid_request_leaves_no_traceback_and_the_server_serves_on(tmp_path, capfd):
    """A killed client (a SIGKILLed sync process, a dropped connection) resets its socket while the server reads its
    next request: socketserver would print a traceback for it."""
    import struct

    with LocalHub(tmp_path / "root", tokens=TOKENS) as hub:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
                s.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 401")
                s.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHo")  # half of the next request, then a reset
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # the reset reached the handler thread once it is gone: wait for the handlers to end, not for a while
        deadline = time.monotonic() + 30
        while hub.open_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not hub.open_connections()
        assert HfApi(endpoint=hub.url, token="tok-alice-write").whoami()["name"] == "alice"
    assert "Traceback" not in "".join(capfd.readouterr())


def test_malformed_requests_get_400_with_a_short_json_error_and_no_traceback(tmp_path, caplog, capfd):
    caplog.set_level("DEBUG")
    with LocalHub(tmp_path / "root", tokens=TOKENS, quiet=False) as hub:
        repo_id = HfApi(endpoint=hub.url, token="tok-alice-write").create_repo("alice/m").repo_id
        for what, method, path, headers, body in MALFORMED:
            framing = {"Content-Length": str(len(body))} if not {"content-length", "transfer-encoding"} & {
                k.lower() for k in headers} else {}
            status, response_headers, answer = _ask(hub, method, path.format(repo=repo_id),
                                                    {**WRITE, **framing, **headers}, raw_tail=body)
            assert status == 400, (what, answer)
            assert list(answer) == ["error"] and 0 < len(answer["error"]) < 300, (what, answer)
            assert response_headers["X-Error-Message"], what
        assert HfApi(endpoint=hub.url, token="tok-alice-write").list_repo_files(repo_id) == [".gitattributes"]
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged and not [r for r in caplog.records if r.exc_info]
    assert " 400" in logged  # the requests were logged (quiet=False), as one line each


BAD_REF_NAMES = [  # (name, the rule the answer names)
    ("a..b", "'..'"), ("a b", "' '"), ("a~b", "'~'"), ("a^b", "'^'"), ("a:b", "':'"), ("a?b", "'?'"),
    ("a*b", "'*'"), ("a[b", "'['"), ("a\\b", "'\\\\'"), ("a\x01b", "control character"),
    ("a\x7fb", "control character"), ("-a", "starts with '-'"), ("/a", "starts with '/'"), ("a/", "ends with '/'"),
    ("a.lock", "ends with '.lock'"), ("a.lock/b", "ends with '.lock'"), ("a.", "ends with '.'"),
    (".a", "starts with '.'"), ("b/.a", "starts with '.'"), ("a@{b", "'@{'"), ("a//b", "'//'"), ("@", "'@'"),
    ("x" * 5000, "5000 bytes long, over the limit of 255 bytes"), ("é" * 128, "256 bytes long"),
    ("HEAD", "would read as HEAD"), ("refs/heads/x", "full ref"), ("0123456789" * 4, "commit id"),
]


def test_branch_and_revision_names_follow_git_check_ref_format(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token="tok-alice-write")
    repo_id = api.create_repo(f"alice/refs-{uuid.uuid4().hex[:8]}").repo_id
    for name, rule in BAD_REF_NAMES:
        with pytest.raises(HfHubHTTPError) as err:
            api.create_branch(repo_id, branch=name)
        assert err.value.response.status_code == 400 and rule in str(err.value), (name, str(err.value))
    for good in ("feature/x", "v1.0", "ünïcode-ß", "a@b", "x" * 255, "release_2024-01.lockless"):
        api.create_branch(repo_id, branch=good)
    assert sorted(b.name for b in api.list_repo_refs(repo_id).branches) == sorted(
        ["main", "feature/x", "v1.0", "ünïcode-ß", "a@b", "x" * 255, "release_2024-01.lockless"])
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(repo_id, tag="v1..0")
    assert err.value.response.status_code == 400 and "invalid tag name 'v1..0'" in str(err.value)

    # Revisions in URLs, commits to a revision included, follow the same rules.
    api.create_commit(repo_id, [CommitOperationAdd("f.txt", b"1")], commit_message="on a branch", revision="feature/x")
    assert "f.txt" in api.list_repo_files(repo_id, revision="refs/heads/feature/x")
    for call in (lambda: api.list_repo_files(repo_id, revision="a..b"),
                 lambda: api.model_info(repo_id, revision="y" * 5000),
                 lambda: api.create_commit(repo_id, [CommitOperationAdd("g.txt", b"2")], commit_message="bad",
                                           revision="bad name")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 400 and "invalid revision" in str(err.value)
    status, headers, _ = _ask(hub, "HEAD", f"/{repo_id}/resolve/a%40%7Bb/f.txt")
    assert status == 400 and "'@{'" in headers["X-Error-Message"]
