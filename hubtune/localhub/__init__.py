"""A local Hugging Face Hub-compatible HTTP server for tests and offline work (see design/hub-protocol.md).

Point the real clients at it with ``HF_ENDPOINT`` (set before importing them) and ``HF_HUB_DISABLE_XET=1``:
``LocalHub.env()`` returns the full environment.

Modules: ``server`` (LocalHub and the HTTP handler), ``routes`` (the route table) dispatching to ``downloads``,
``uploads`` and ``admin``, which share ``request`` (reading and answering), ``body`` (framing, size limits and
checked JSON), ``refnames`` (git's ref name rules) and ``auth``; storage is ``store``
(repos, commits, refs) over ``objects`` (content-addressed files); ``serve`` is the command line.
"""

from hubtune.localhub.body import BodyLimits
from hubtune.localhub.serve import add_serve_arguments, parse_tokens, run_serve
from hubtune.localhub.server import LocalHub, RequestRecord
from hubtune.localhub.store import HubStore

__all__ = ["BodyLimits", "HubStore", "LocalHub", "RequestRecord", "add_serve_arguments", "parse_tokens", "run_serve"]
