"""Request bodies: framing (Content-Length or chunked), size limits, and JSON / NDJSON parsed into checked shapes.

Every route that reads a body names the :class:`BodyLimits` field that bounds it (``routes.py``). A declared
Content-Length over the limit gets 413 before a byte of the body is read; a chunked body, which declares no length,
gets 413 before the chunk that would cross the limit is read. Bodies are read in chunks: only the small JSON API
bodies are ever held whole in memory, the commit NDJSON is parsed a line at a time, and uploads go to disk.
Malformed framing or content is a :class:`HubError` 400 whose message names what was wrong, never a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from email.message import Message
from io import BufferedIOBase
from typing import Any

from hubtune.localhub.errors import HubError

_CHUNK = 1 << 20
_MAX_CHUNK_LINE = 4096  # a chunk-size line (hex size plus extensions) or a trailer line
_MAX_TRAILERS = 64
_LENGTH = re.compile(r"[0-9]{1,18}")
_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
_REQUIRED: Any = object()
LIMIT_HINTS = {  # what to do about a 413, by BodyLimits field
    "commit": "; commit fewer regular files at once (files of 10 MB or more go through LFS)",
    "upload": "; start the server with a larger --max-upload-size (or LocalHub(limits=BodyLimits(upload=...)))",
}
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


@dataclass(frozen=True)
class BodyLimits:
    """The largest request body, in bytes, that each kind of endpoint reads; a bigger one gets 413 unread."""

    form: int = 64 << 10
    """create repo, settings, branch, tag and LFS verify: a few fields."""
    listing: int = 4 << 20
    """preupload, LFS batch and paths-info (an entry per file; huggingface_hub sends 256 a request), validate-yaml."""
    commit: int = 256 << 20
    """a commit's NDJSON, which inlines its regular files (under 10 MB each; LFS files go to the upload URL)."""
    commit_line: int = 16 << 20
    """one NDJSON line, the most a commit holds in memory: a regular file of up to 10 MB, base64-encoded."""
    upload: int = 50 << 30
    """one LFS object, streamed to disk (the Hub's own limit per file is 50 GB)."""

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1]
        if bad:
            raise ValueError(f"body limits must be positive byte counts, got {', '.join(bad)}")


def human_size(n: int) -> str:
    """``n`` bytes in the largest binary unit it fills, with one decimal: ``4.0 MiB``."""
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def too_large(size: int, limit: int, what: str, hint: str = "") -> HubError:
    """The 413 for a body of ``size`` (or more) bytes where ``what`` takes at most ``limit``."""
    return HubError(f"{what} is {size} bytes, over its limit of {limit} bytes ({human_size(limit)}){hint}",
                    status=413)


def declared_length(headers: Message) -> int | None:
    """The body length the headers declare: None for a chunked body, 0 for none; HubError 400 when malformed."""
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = {v.strip() for v in headers.get_all("Content-Length") or []}
    if encodings:
        if [e.strip().lower() for e in ",".join(encodings).split(",")] != ["chunked"]:
            raise HubError(f"Transfer-Encoding {', '.join(encodings)[:40]!r} is not supported; send the body "
                           "with a Content-Length or as 'chunked'")
        if lengths:  # two framings: which one the client meant is a guess (request smuggling)
            raise HubError("the request has both Content-Length and Transfer-Encoding; send one of them")
        return None
    if len(lengths) > 1:
        raise HubError(f"the request has conflicting Content-Length headers {sorted(lengths)}; send one")
    value = lengths.pop() if lengths else "0"
    if not _LENGTH.fullmatch(value):
        raise HubError(f"Content-Length must be a non-negative whole number of bytes, got {value[:40]!r}")
    return int(value)


class BodyReader:
    """Reads one request body in chunks, at most ``limit`` bytes of it; ``done`` once its end was read."""

    def __init__(self, rfile: BufferedIOBase, length: int | None, limit: int, what: str, hint: str = "") -> None:
        if length is not None and length > limit:
            raise too_large(length, limit, what, hint)
        self._rfile, self._limit, self._what, self._hint = rfile, limit, what, hint
        self._left = length  # Content-Length bytes not read yet; None for a chunked body
        self._chunk_left = 0
        self.received = 0
        self.done = length == 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of a chunk); b"" at the end of the body."""
        if self.done or n <= 0:
            return b""
        if self._left is None and self._chunk_left == 0:
            self._next_chunk()
            if self.done:
                return b""
        want = min(n, self._left if self._left is not None else self._chunk_left)
        data = self._rfile.read(want)
        if len(data) < want:
            raise HubError(f"{self._what} ended after {self.received + len(data)} bytes, before the length "
                           "its headers declared; send the whole body")
        self.received += len(data)
        if self._left is not None:
            self._left -= len(data)
            self.done = self._left == 0
        else:
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and self._rfile.readline(_MAX_CHUNK_LINE).strip():
                raise HubError(f"{self._what} is not valid chunked encoding: a chunk is longer than its size")
        return data

    def _next_chunk(self) -> None:
        line = self._rfile.readline(_MAX_CHUNK_LINE + 1)
        size_text = line.split(b";")[0].strip()
        if not line.endswith(b"\n") or not _HEX_SIZE.fullmatch(size_text):
            raise HubError(f"{self._what} is not valid chunked encoding: chunk size {size_text[:20]!r} is not hex")
        size = int(size_text, 16)
        if size == 0:
            for _ in range(_MAX_TRAILERS):
                if self._rfile.readline(_MAX_CHUNK_LINE) in (b"\r\n", b"\n", b""):
                    self.done = True
                    return
            raise HubError(f"{self._what} is not valid chunked encoding: over {_MAX_TRAILERS} trailer lines")
        if self.received + size > self._limit:
            raise too_large(self.received + size, self._limit, self._what, self._hint)
        self._chunk_left = size

    def read_all(self) -> bytes:
        """The rest of the body (at most ``limit`` bytes, so only for the small bodies)."""
        chunks = []
        while chunk := self.read(_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def lines(self, max_line: int) -> Iterator[tuple[int, bytes]]:
        """(1-based number, line without its newline) for each line; HubError 413 for one over ``max_line``."""
        parts: list[bytes] = []
        pending, number = 0, 0
        while data := self.read(_CHUNK):
            *complete, rest = data.split(b"\n")
            for piece in complete:
                number += 1
                if pending + len(piece) > max_line:
                    raise too_large(pending + len(piece), max_line, f"line {number} of {self._what}")
                parts.append(piece)
                yield number, b"".join(parts)
                parts, pending = [], 0
            parts.append(rest)
            pending += len(rest)
            if pending > max_line:
                raise too_large(pending, max_line, f"line {number + 1} of {self._what}")
        if pending:
            yield number + 1, b"".join(parts)


def parse_json(raw: bytes, what: str) -> Any:
    """``raw`` parsed as JSON; HubError 400 naming ``what`` when it is not valid JSON (or UTF-8)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HubError(f"{what} is not valid JSON: {str(err)[:120]}") from None


def kind_of(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages: "an array", "a string"..."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def as_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object; HubError 400 otherwise."""
    if not isinstance(value, dict):
        raise HubError(f"{what} must be a JSON object, got {kind_of(value)}")
    return value


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, default: Any = _REQUIRED) -> Any:
    """``obj[key]`` checked to be of ``kind``; ``default`` when it is missing or null, HubError 400 without one."""
    value = obj.get(key)
    if value is None:
        if default is _REQUIRED:
            raise HubError(f"{what} needs {key!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # bool is an int
        expected = " or ".join(_JSON_KINDS.get(k, k.__name__) for k in kinds)
        raise HubError(f"{what}: {key!r} must be {expected}, got {kind_of(value)}")
    return value


def ndjson_objects(reader: BodyReader, max_line: int, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of an NDJSON body; HubError 400 for a line that is not one."""
    for number, line in reader.lines(max_line):
        if line.strip():
            yield number, as_object(parse_json(line, f"line {number} of the {what}"), f"line {number} of the {what}")
