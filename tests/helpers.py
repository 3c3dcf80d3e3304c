"""Tiny generated image datasets for the tests (no downloads).

Two classes that a tiny network separates after a few dozen steps: "cat" images are warm (red-dominant)
with a bright square, "dog" images are cool (blue-dominant) with a dark square, both with noise.
"""

from __future__ import annotations

import io
import random
import socket
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog")
# (name, label) of the files that cannot be decoded; tests count these exactly.
BAD_FILES = (("zero_bytes.jpg", 0), ("truncated.jpg", 1), ("not_an_image.png", 0))


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_rgb(label: int, rng: random.Random, size: int = 40) -> Image.Image:
    """One synthetic image of class `label`."""
    arr = np.empty((size, size, 3), dtype=np.float32)
    base = np.array([200, 80, 60] if label == 0 else [60, 90, 200], dtype=np.float32)
    arr[:] = base + np.array([rng.uniform(-40, 40) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 25, arr.shape)
    arr += noise
    s = rng.randrange(size // 4, size // 2)
    x, y = rng.randrange(0, size - s), rng.randrange(0, size - s)
    arr[y : y + s, x : x + s] = 240 if label == 0 else 20
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def odd_mode_images(rng: random.Random) -> list[tuple[str, bytes, int]]:
    """Decodable images in modes that must become RGB: L, P, RGBA, CMYK, I;16, EXIF-rotated."""
    out = []
    img = make_rgb(0, rng)
    out.append(("gray.png", _encode(img.convert("L"), "PNG"), 0))
    out.append(("palette.png", _encode(make_rgb(1, rng).convert("P"), "PNG"), 1))
    rgba = make_rgb(0, rng).convert("RGBA")
    rgba.putalpha(128)
    out.append(("rgba.png", _encode(rgba, "PNG"), 0))
    out.append(("cmyk.jpg", _encode(make_rgb(1, rng).convert("CMYK"), "JPEG"), 1))
    deep = (np.asarray(make_rgb(0, rng).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    out.append(("deep16.png", _encode(Image.fromarray(deep), "PNG"), 0))
    rotated = make_rgb(1, rng).resize((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif.tobytes())
    out.append(("exif_rotated.jpg", buf.getvalue(), 1))
    return out


def bad_images(rng: random.Random) -> list[tuple[str, bytes, int]]:
    jpeg = _encode(make_rgb(1, rng), "JPEG")
    payloads = {"zero_bytes.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 3], "not_an_image.png": b"hello" * 20}
    return [(name, payloads[name], label) for name, label in BAD_FILES]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def examples(per_class: int, seed: int = 0, bad: bool = False, odd: bool = True) -> list[tuple[str, bytes, int]]:
    """(file name, encoded bytes, label) for a deterministic two-class dataset."""
    rng = random.Random(seed)
    items = []
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            fmt = "PNG" if i % 2 else "JPEG"
            items.append((f"{name}_{i:04d}.{fmt.lower()}", _encode(make_rgb(label, rng), fmt), label))
    if odd:
        items += odd_mode_images(rng)
    if bad:
        items += bad_images(rng)
    rng.shuffle(items)  # stored in no particular class order, like most real datasets
    return items


def make_image_dataset(root: Path, layout: str, per_class: int, seed: int = 0, bad: bool = False) -> Path:
    """Write the dataset as `imagefolder` (root/cat/*.png ...) or `parquet` (root/train.parquet); return its path."""
    items = examples(per_class, seed=seed, bad=bad)
    if layout == "imagefolder":
        for name, data, label in items:
            folder = root / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return root
    if layout == "parquet":
        import datasets

        features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=list(CLASSES))})
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": d, "path": n} for n, d, _ in items], "labels": [lab for _, _, lab in items]},
            features=features,
        )
        path = root / "train.parquet"
        ds.to_parquet(str(path))
        return path
    raise ValueError(f"layout must be 'imagefolder' or 'parquet', got {layout!r}")
