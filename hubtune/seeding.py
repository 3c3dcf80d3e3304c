"""Per-example augmentation seeding: a transform run under its own seed, whatever process or worker runs it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def seeded(transform: Callable, img: Any, seed: int) -> Any:
    """Run `transform` with python/numpy/torch CPU RNGs seeded by `seed`, leaving the global RNG streams untouched.

    Only the CPU generator is seeded: torch.manual_seed also visits every accelerator generator, which costs more
    than a small image's augmentation, and transforms draw from the CPU generator. In a DataLoader worker the
    global streams serve nothing but these transforms, so they are not saved and restored (numpy's state alone
    takes ~140 us per image).
    """
    keep = torch.utils.data.get_worker_info() is None
    if keep:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return transform(img)
    finally:
        if keep:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
