"""What `hubtune demo` prints: its narration, and which lines of its children it leaves out."""

from __future__ import annotations

import re

STEPS = 7
RESULT_PREFIX = "RESULT "  # the last line a `hubtune.demo.child` step prints: RESULT {json}
HIDDEN_LINES = re.compile(rf"^(HTTP Request: |Setting num_proc from |{RESULT_PREFIX})")


def say(message: str = "") -> None:
    print(message, flush=True)


def step(number: int, title: str) -> None:
    say(f"\n[{number}/{STEPS}] {title}")
