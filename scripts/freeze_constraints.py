"""Prints constraints.txt: the installed version of every package `pip install -e ".[dev]"` needs, in the
environment that runs it (the one the suite passed in), read from pyproject.toml's dependencies and dev extra,
without torch, torchvision and what only they need (installed first, by their own command). Refresh after a
green run:

    .venv/bin/python scripts/freeze_constraints.py > constraints.txt
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: huggingface_hub brings tomli
    import tomli as tomllib

SKIP = {"torch", "torchvision"}


def needs(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**default_environment(), "extra": e}) for e in extras or {""})


def main() -> None:
    pins: dict[str, str] = {}
    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]  # not hubtune's installed metadata, which may predate an edit
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            raise SystemExit(f"freeze_constraints: {req.name} is needed but not installed here")
        if name in SKIP:
            continue  # torch, torchvision: installed first, their own requirements with them
        pins[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if needs(sub, set(req.extras)):
                todo.append(sub)
    print("# The versions the test suite passed on (Python 3.11, torch 2.14.1, torchvision 0.29.1), for")
    print('# `pip install -c constraints.txt -e ".[dev]"`. Made by scripts/freeze_constraints.py; the bounds')
    print("# users get are in pyproject.toml (scripts/check_oldest.sh, scripts/check_newest.sh test both ends).")
    for name in sorted(pins, key=str.lower):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
