"""Synthetic images for `hubtune demo`: the backbone's pre-training task and the "cats vs dogs" stand-in.

Two generated tasks, both deterministic from a seed:

* the backbone's pre-training task: four full-frame textures (stripes, checks, dots, rings) in random colours,
  so colour says nothing and the early layers must learn oriented edges and blobs;
* the fine-tuning task, a "cats vs dogs" stand-in: a head with ears on a noisy background. Cats are warmer, have
  pointed ears and wavy tabby stripes; dogs are browner, have drooping ears and blotchy spots. Colours overlap
  and every image gets noise and JPEG compression, so no single pixel statistic decides the class.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog")
TEXTURES = ("stripes", "checks", "dots", "rings")
DATASET_PX = 64  # stored JPEG size; the demo fine-tunes at 48 px
BACKBONE_PX = 32  # pre-training resolution: cheap, and the texture features still transfer to 48 px

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates in [0, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _to_image(arr: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    arr = arr * rng.uniform(0.8, 1.2) + rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def texture(label: int, rng: np.random.Generator, size: int = BACKBONE_PX) -> Image.Image:
    """One image of the backbone's pre-training task: texture `TEXTURES[label]` in two random colours."""
    y, x = _grid(size)
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    if TEXTURES[label] == "stripes":
        mask = np.sin(2 * np.pi * u / period) > 0
    elif TEXTURES[label] == "checks":
        mask = (np.floor(u / period * 2) + np.floor(v / period * 2)) % 2 == 0
    elif TEXTURES[label] == "dots":
        mask = np.zeros_like(x, dtype=bool)
        for cy, cx in rng.uniform(0, 1, (rng.integers(6, 14), 2)):
            mask |= (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(0.04, 0.09) ** 2
    else:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        mask = np.sin(2 * np.pi * np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / period) > 0
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = np.where(mask[..., None], fg, bg)
    return _to_image(arr, rng, noise=20)


def animal(label: int, rng: np.random.Generator, size: int = DATASET_PX) -> Image.Image:
    """One "cat" (0) or "dog" (1) image: ears, fur colour and fur pattern all differ by class, with overlap."""
    y, x = _grid(size)
    cat = CLASSES[label] == "cat"
    cy, cx, r = rng.uniform(0.58, 0.64), rng.uniform(0.42, 0.58), rng.uniform(0.34, 0.4)
    head = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    ears = np.zeros_like(head)
    for side in (-1, 1):
        ex = cx + side * r * 0.62
        if cat:  # pointed: a triangle standing on the top of the head
            top, half = cy - r * 1.45, r * 0.42
            t = (y - top) / (cy - r * 0.3 - top)
            ears |= (t >= 0) & (t <= 1) & (np.abs(x - ex) < half * t)
        else:  # drooping: a long ellipse hanging at the side of the head
            ey, ecx = cy + r * 0.05, cx + side * r * 0.95
            ears |= ((y - ey) / (r * 0.75)) ** 2 + ((x - ecx) / (r * 0.3)) ** 2 < 1
    body = head | ears
    base = np.array([210, 145, 75] if cat else [125, 95, 90], dtype=np.float32) + rng.normal(0, 25, 3)
    dark = base * rng.uniform(0.3, 0.55)
    if cat:  # wavy tabby stripes across the fur
        theta, period = rng.uniform(-0.5, 0.5) + np.pi / 2 * rng.integers(0, 2), rng.uniform(0.14, 0.2)
        u = x * np.cos(theta) + y * np.sin(theta)
        w = -x * np.sin(theta) + y * np.cos(theta)
        pattern = np.sin(2 * np.pi * (u + 0.03 * np.sin(2 * np.pi * w * 2.5)) / period) > 0.1
    else:  # irregular blotches
        pattern = np.zeros_like(head)
        for by, bx in rng.uniform(0.1, 0.9, (rng.integers(3, 7), 2)):
            ry, rx = rng.uniform(0.06, 0.14, 2)
            pattern |= ((y - by) / ry) ** 2 + ((x - bx) / rx) ** 2 < 1
    fur = np.where(pattern[..., None], dark, base)
    background = rng.uniform(40, 220, 3) + rng.normal(0, 12, (size, size, 3))
    arr = np.where(body[..., None], fur, background)
    for side in (-1, 1):  # eyes
        eye = (y - (cy - r * 0.15)) ** 2 + (x - (cx + side * r * 0.38)) ** 2 < (r * 0.11) ** 2
        arr[eye] = (20, 20, 20)
    return _to_image(arr, rng, noise=18)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def animals(n: int, seed: int) -> list[tuple[bytes, int]]:
    """`n` (JPEG bytes, label) pairs, classes alternating, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    return [(jpeg(animal(i % 2, rng)), i % 2) for i in range(n)]


def textures(n: int, seed: int, size: int = BACKBONE_PX) -> tuple[np.ndarray, np.ndarray]:
    """`n` texture images as a uint8 array (n, size, size, 3) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(TEXTURES)
    return np.stack([np.asarray(texture(int(k), rng, size)) for k in labels]), labels


def pretrain_backbone(steps: int, seed: int, log: Callable[[str], None]) -> tuple[Any, float]:
    """Train timm's tiny `test_resnet` on the texture task; return (model, held-out accuracy)."""
    import torch

    # one thread, as `accelerate launch` gives train.py: these convolutions are too small to split, and on 2 shared
    # cores two threads waiting on each other made 250 steps take 143 s instead of 10 s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(steps, seed, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(steps: int, seed: int, log: Callable[[str], None]) -> tuple[Any, float]:
    import timm
    import torch
    import torch.nn.functional as F

    from hubtune.model import as_timm

    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=len(TEXTURES))
    pretrained_cfg = as_timm(net).pretrained_cfg
    mean = torch.tensor(pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pretrained_cfg["std"]).view(1, 3, 1, 1)

    def tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr, labels = textures(n, seed)
        return (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - mean) / std, torch.from_numpy(labels)

    x, y = tensors(max(steps * 4, 512), seed)
    x_val, y_val = tensors(256, seed + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        batch = x[idx].flip(3) if step % 2 else x[idx]
        loss = F.cross_entropy(net(batch), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % max(steps // 6, 1) == 0 or step == steps:
            log(f"pre-training step {step}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_val).argmax(1) == y_val).float().mean().item()
    return net, accuracy
