"""``python -m hubtune.localhub --root DIR ...``: the same as ``hubtune hub serve``."""

from __future__ import annotations

import argparse
import sys

from hubtune.errors import run_guarded
from hubtune.localhub.serve import DESCRIPTION, add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    """Parse the ``hub serve`` options and serve; a HubtuneError ends as one line on stderr."""
    parser = argparse.ArgumentParser(prog="python -m hubtune.localhub", description=DESCRIPTION)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_serve(args))


if __name__ == "__main__":
    sys.exit(main())
