"""``hubtune hub serve`` / ``python -m hubtune.localhub``: serve a storage root in the foreground.

The banner prints the environment a client needs. Tokens are credentials, so it prints none unless asked
(``--print-token``, one write token), except a token it generated itself: without it nobody could push.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import secrets
import signal
import threading
from dataclasses import replace
from pathlib import Path

from hubtune.errors import ConfigError
from hubtune.localhub.body import BodyLimits
from hubtune.localhub.server import LocalHub

DEFAULT_PORT = 8765
DEFAULT_USER = "user"
_SIZE = re.compile(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*", re.IGNORECASE)
DESCRIPTION = "Serve a Hub-compatible API from a directory (for offline use and tests) until Ctrl-C."


def parse_tokens(specs: list[str], tokens_file: str | None) -> dict[str, tuple[str, str]]:
    """Tokens from ``NAME=VALUE[:read|write]`` specs and a JSON or one-spec-per-line file; role defaults to write.

    The result lists the ``specs`` first, in order, then the file's tokens; a spec wins over the file for the
    same token value.

    Raises:
        ConfigError: a malformed spec, or a tokens file that cannot be read or parsed.
    """
    file_tokens: dict[str, tuple[str, str]] = {}
    lines: list[str] = []
    if tokens_file:
        try:
            text = Path(tokens_file).read_text()
            if text.lstrip().startswith(("{", "[")):
                data = json.loads(text)
                items = data.items() if isinstance(data, dict) else ((d["token"], d) for d in data)
                for token, value in items:
                    user, role = (value["user"], value.get("role", "write")) if isinstance(value, dict) else value
                    file_tokens[token] = (user, role)
            else:
                lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--tokens-file {tokens_file}: cannot read it ({err}); expected JSON "
                              '{"token": ["user", "role"]} or one NAME=VALUE[:read|write] per line') from None
    tokens = _parse_specs(specs)
    for token, ident in {**file_tokens, **_parse_specs(lines)}.items():
        tokens.setdefault(token, ident)
    for user, role in tokens.values():
        if role not in ("read", "write") or not user:
            raise ConfigError(f"token role of user {user!r} must be 'read' or 'write', got {role!r}; "
                              "fix --tokens-file")
    return tokens


def _parse_specs(specs: list[str]) -> dict[str, tuple[str, str]]:
    tokens: dict[str, tuple[str, str]] = {}
    for spec in specs:
        user, sep, value = spec.partition("=")
        role = "write"
        if value.rsplit(":", 1)[-1] in ("read", "write") and ":" in value:
            value, role = value.rsplit(":", 1)
        if not sep or not user or not value:
            raise ConfigError(f"--token must look like NAME=VALUE[:read|write] (NAME is the user), got {spec!r}")
        tokens[value] = (user, role)
    return tokens


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hub serve`` options to ``parser``."""
    parser.add_argument("--root", required=True, help="storage directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one")
    parser.add_argument("--token", action="append", default=[], metavar="NAME=VALUE[:read|write]",
                        help="accept token VALUE for user NAME (role defaults to write); repeatable")
    parser.add_argument("--tokens-file", metavar="FILE",
                        help='JSON {"token": ["user", "role"]} or one NAME=VALUE[:role] per line')
    parser.add_argument("--user", metavar="NAME",
                        help=f"without --token/--tokens-file, a write token is generated for this user "
                             f"(default {DEFAULT_USER!r}) and printed")
    parser.add_argument("--print-token", action="store_true",
                        help="also print `export HF_TOKEN=...` with the first write token given")
    parser.add_argument("--org", action="append", default=[], metavar="USER=ORG[,ORG...]",
                        help="let USER write to the ORG namespaces; repeatable")
    parser.add_argument("--page-size", type=int, default=1000, help="entries per page of tree listings")
    parser.add_argument("--max-upload-size", default=None, metavar="SIZE",
                        help=f"largest LFS file accepted, in bytes or with a unit: 500M, 2G, 1T "
                             f"(default {BodyLimits().upload >> 30}G)")
    parser.add_argument("--log-requests", action="store_true", help="log one line per request to stderr")


def parse_size(text: str, option: str) -> int:
    """A byte count written as digits with an optional binary unit (``K``, ``M``, ``G``, ``T``; ``KiB``...).

    Raises:
        ConfigError: ``text`` is not such a count, or is zero.
    """
    match = _SIZE.fullmatch(text)
    size = int(match[1]) << (10 * " KMGT".index((match[2] or " ").upper())) if match else 0
    if size < 1:
        raise ConfigError(f"{option} must be a positive number of bytes, optionally with a unit (500M, 2G), "
                          f"got {text!r}")
    return size


def _parse_orgs(specs: list[str]) -> dict[str, list[str]]:
    orgs: dict[str, list[str]] = {}
    for spec in specs:
        user, sep, names = spec.partition("=")
        if not sep or not user or not names:
            raise ConfigError(f"--org must look like USER=ORG[,ORG...], got {spec!r}")
        orgs.setdefault(user, []).extend(n for n in names.split(",") if n)
    return orgs


def banner(hub: LocalHub, token: str | None, note: str) -> list[str]:
    """The lines printed at startup: where the Hub is, the client environment, and ``note`` (about tokens)."""
    lines = [f"# local Hub serving {hub.store.root} at {hub.url}; stop with Ctrl-C",
             "# set these before starting Python (the HF clients read them at import):"]
    lines += [f"export {key}={value}" for key, value in hub.env(token).items()]
    return lines + ([note] if note else [])


def run_serve(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT/SIGTERM, after printing the client environment; return 0.

    Raises:
        ConfigError: bad --token/--tokens-file/--org/--user/--max-upload-size values, or the address cannot be
            bound.
    """
    if args.page_size < 1:
        raise ConfigError(f"--page-size must be at least 1, got {args.page_size}")
    orgs = _parse_orgs(args.org)
    tokens = parse_tokens(args.token, args.tokens_file)
    if tokens and args.user:
        raise ConfigError("--user only names the owner of the generated token, and none is generated when "
                          "--token or --tokens-file is given; give the user in --token NAME=VALUE instead")
    shown: str | None
    if not tokens:
        user = args.user or DEFAULT_USER
        token = "hf_local_" + secrets.token_urlsafe(24)
        tokens = {token: (user, "write")}
        shown, note = token, f"# generated a write token for {user!r} (valid for this server run only)"
    elif args.print_token:
        shown = next((t for t, (_, role) in tokens.items() if role == "write"), None)
        note = "" if shown else "# --print-token: no write token was given, so none is printed"
    else:
        shown, note = None, "# tokens are not printed; add --print-token to include HF_TOKEN (first write token)"
    if args.log_requests:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limits = BodyLimits()
    if args.max_upload_size is not None:
        limits = replace(limits, upload=parse_size(args.max_upload_size, "--max-upload-size"))
    hub = LocalHub(args.root, args.host, args.port, tokens, quiet=not args.log_requests, orgs=orgs,
                   page_size=args.page_size, limits=limits).start()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print("\n".join(banner(hub, shown, note)), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        hub.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
