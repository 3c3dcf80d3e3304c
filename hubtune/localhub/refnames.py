"""Branch, tag and revision names: git's ``check-ref-format`` rules plus a length limit; a refusal names its rule.

The Hub stores refs in git, so a name git refuses could never be pushed or cloned; checking here also keeps
control characters and pathological lengths out of URLs, headers and ``repo.json``.
"""

from __future__ import annotations

import re

from hubtune.localhub.errors import HubError

MAX_REF_BYTES = 255  # of UTF-8, like a file name on most filesystems (git stores loose refs as files)
_FORBIDDEN = " ~^:?*[\\"
_HEX40 = re.compile(r"[0-9a-f]{40}")
_REVISION_PREFIXES = ("refs/heads/", "refs/tags/", "refs/pr/", "refs/convert/")


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"


def ref_problem(name: str) -> str | None:
    """The ``git check-ref-format --branch`` rule ``name`` breaks, or None when git accepts it."""
    if not name:
        return "it is empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_REF_BYTES:
        return f"it is {size} bytes long, over the limit of {MAX_REF_BYTES} bytes"
    control = next((c for c in name if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if control is not None:
        return f"it contains the control character {control!r}"
    bad = next((c for c in name if c in _FORBIDDEN), None)
    if bad is not None:
        return f"it contains {bad!r} (git refuses space and any of ~^:?*[\\)"
    for text, rule in (("..", "'..'"), ("@{", "'@{'"), ("//", "'//' (an empty part)")):
        if text in name:
            return f"it contains {rule}"
    if name == "@":
        return "it is '@' (git's name for HEAD)"
    if name.startswith(("/", "-")):
        return f"it starts with {name[0]!r}"
    if name.endswith(("/", ".")):
        return f"it ends with {name[-1]!r}"
    for part in name.split("/"):
        if part.startswith("."):
            return f"its part {_shown(part)} starts with '.'"
        if part.endswith(".lock"):
            return f"its part {_shown(part)} ends with '.lock'"
    return None


def check_ref_name(name: str, what: str) -> str:
    """Return ``name`` if git accepts it as a branch or tag name; HubError 400 naming the broken rule otherwise.

    Besides git's rules, a name may not look like a commit id or a full ref (``refs/...``), nor be ``HEAD``:
    revisions in URLs could not tell them apart from the ref.
    """
    problem = ref_problem(name)
    if problem is None and (name == "HEAD" or name.startswith("refs/") or _HEX40.fullmatch(name)):
        problem = "it would read as HEAD, a full ref (refs/...) or a commit id"
    if problem is not None:
        raise HubError(f"invalid {what} name {_shown(name)}: {problem}; {what} names follow git check-ref-format")
    return name


def check_revision(rev: str) -> str:
    """Return ``rev`` (a branch, tag, ``refs/...`` name or commit id) if it is well formed; HubError 400 if not."""
    name = next((rev[len(p):] for p in _REVISION_PREFIXES if rev.startswith(p)), rev)
    problem = ref_problem(name)
    if problem is not None:
        raise HubError(f"invalid revision {_shown(rev)}: {problem}; revisions are branch, tag or refs/... names "
                       "that follow git check-ref-format, or commit ids")
    return rev
