"""Generated benchmark data: Cats-vs-Dogs-like JPEGs written as parquet shards, cached under bench/.cache/.

microsoft/cats_vs_dogs holds ~23k photos of mostly 500x375 px (some portrait, some smaller) as JPEG bytes in
parquet files with an `image` (Image) and a `labels` (ClassLabel) column, 100 rows per row group. The generated
images have that geometry, are saved at quality 90 and have photo-like entropy (smooth colour fields, mid-frequency
texture, sensor-like noise and a few solid shapes), so they come out around 35 KB and cost about as much to decode
as the real photos. Contents are deterministic from the seed; the files are rebuilt only when missing.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CACHE = Path(__file__).resolve().parent / ".cache"
CLASSES = ("cat", "dog")
ROW_GROUP = 100  # rows per parquet row group, as in the Hub's parquet exports of image datasets
# (width, height, weight): the common Cats vs Dogs geometries
SIZES = ((500, 375, 0.55), (375, 500, 0.15), (500, 333, 0.1), (499, 442, 0.1), (320, 240, 0.1))
_TILE = 640
VERSION = 2  # part of the cache folder name: bump when the generated content changes


def _textures(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    noise = [np.clip(rng.normal(0, 1, (_TILE, _TILE, 3)), -3, 3).astype(np.float32) for _ in range(2)]
    tex = []
    for _ in range(4):
        small = Image.fromarray(rng.integers(0, 256, (_TILE // 6, _TILE // 6), dtype=np.uint8))
        tex.append(np.asarray(small.resize((_TILE, _TILE), Image.BILINEAR), dtype=np.float32)[..., None] / 128 - 1)
    return noise, tex


def photo(rng: np.random.Generator, size: tuple[int, int], noise: list, tex: list, quality: int = 90,
          fine: float = 4.0, mid: float = 25.0) -> bytes:
    """One photo-like JPEG of `size` (w, h)."""
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    oy, ox = rng.integers(0, _TILE - h + 1), rng.integers(0, _TILE - w + 1)
    arr = np.asarray(base, dtype=np.float32) + tex[rng.integers(len(tex))][oy:oy + h, ox:ox + w] * mid
    arr += noise[rng.integers(len(noise))][oy:oy + h, ox:ox + w] * fine
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - w // 10)), int(rng.integers(0, h - h // 10))
        x1, y1 = x0 + int(rng.integers(w // 16, w // 2)), y0 + int(rng.integers(h // 16, h // 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _shard(args: tuple[Path, int, int, int, tuple[int, int] | None]) -> int:
    path, seed, shard, rows, fixed = args
    import datasets
    import pyarrow.parquet as pq

    noise, tex = _textures(seed)
    rng = np.random.default_rng([seed, shard])
    sizes, weights = [s[:2] for s in SIZES], np.array([s[2] for s in SIZES])
    images, labels = [], []
    for i in range(rows):
        size = fixed or sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        images.append({"bytes": photo(rng, size, noise, tex), "path": f"{shard:05d}_{i:05d}.jpg"})
        labels.append(int(rng.integers(len(CLASSES))))
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=list(CLASSES))})
    table = datasets.Dataset.from_dict({"image": images, "labels": labels}, features=features).data.table
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent runs may build the same cache
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    tmp.rename(path)
    return rows


def dataset(n: int, shards: int, *, name: str | None = None, size: tuple[int, int] | None = None,
            seed: int = 0) -> Path:
    """A directory of `shards` parquet files holding `n` generated images in total (built once, then cached).

    Args:
        n: number of images (a multiple of `shards`).
        shards: number of parquet files, named like the Hub's (`train-00000-of-00004.parquet`).
        name: cache folder name; derived from the arguments when None.
        size: (w, h) of every image; Cats-vs-Dogs-like mixed geometries when None.
        seed: generator seed.
    """
    per = n // shards
    tag = f"{size[0]}x{size[1]}" if size else "cvd"
    root = CACHE / "data" / (name or f"v{VERSION}-{tag}-{n}-{shards}-s{seed}") / "data"
    done = root / "done.json"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"train-{i:05d}-of-{shards:05d}.parquet", seed, i, per, size) for i in range(shards)]
    jobs = [j for j in jobs if not j[0].is_file()]
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_shard, jobs))
    tmp = done.with_name(f".done.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"images": per * shards, "shards": shards, "size": size, "seed": seed}))
    tmp.replace(done)
    return root


def files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("*.parquet"))


def stats(root: Path) -> dict:
    """Image count, mean encoded size and mean geometry of a generated dataset (for the results)."""
    import pyarrow.parquet as pq

    n, total, pixels = 0, 0, 0
    for f in files(root):
        for value in pq.read_table(f, columns=["image"]).column("image").to_pylist():
            n += 1
            total += len(value["bytes"])
            if n <= 200:
                w, h = Image.open(io.BytesIO(value["bytes"])).size
                pixels += w * h
    return {"images": n, "mean_jpeg_kb": round(total / max(n, 1) / 1024, 1),
            "mean_megapixels_first_200": round(pixels / min(n, 200) / 1e6, 3) if n else 0}
