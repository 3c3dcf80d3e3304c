"""`--decode-device cuda`: loader workers only read, hash and plan; JPEGs are decoded and augmented per batch on
the training device.

A worker opens each image's header (format, size, EXIF orientation) and draws the example's augmentation exactly
as the CPU path does: the same timm/torchvision transform objects draw from the same per-example seed, in the same
order (RandomResizedCrop box and interpolation, flip, color-jitter order and factors), so the same examples get the
same boxes. The training process then decodes the batch's JPEGs with torchvision.io.decode_jpeg on the device and
replays each plan there (EXIF rotation, crop, antialiased resize, flip, jitter; eval: resize and center crop).

Images the device decoder cannot take (not JPEG, CMYK or other modes, a file it rejects) fall back to the CPU path
per image: PIL in the worker, or in the training process when the device decoder fails on the file; undecodable
ones are skipped and counted as on the CPU path. The pixels are not bitwise PIL's (resize kernels, rounding):
tests/test_device_decode.py bounds the difference.

The same code runs with device="cpu" (torchvision's CPU decoder), which is how the tests cover it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hubtune.data import DECODE_ERRORS, decode
from hubtune.errors import ConfigError
from hubtune.seeding import seeded

if TYPE_CHECKING:
    from hubtune.stream import Batch

logger = logging.getLogger("hubtune")

ORIENTATION = 0x0112  # EXIF tag
DEVICE_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into the same RGB as PIL's convert("RGB")
_PASSTHROUGH = (MaybePILToTensor, MaybeToTensor, T.PILToTensor)


def check(transform: Callable) -> None:
    """Raise ConfigError when `transform` holds a step this path cannot replay on the device."""
    unknown = [type(op).__name__ for op in getattr(transform, "transforms", [transform])
               if not isinstance(op, (*_PASSTHROUGH, RandomResizedCropAndInterpolation, T.RandomHorizontalFlip,
                                      T.ColorJitter, T.Resize, v2.Resize, T.CenterCrop, v2.CenterCrop))]
    if unknown:
        raise ConfigError(f"--decode-device cuda: cannot replay {', '.join(unknown)} on the device (it replays timm's "
                          "RandomResizedCrop, flip, color jitter, resize and center crop); use --decode-device cpu")


@dataclass(frozen=True)
class ResizedCrop:
    """timm's RandomResizedCrop as drawn: the box (top, left, height, width), then a resize to `size`."""

    top: int
    left: int
    height: int
    width: int
    size: list[int]
    interpolation: Any  # torchvision's InterpolationMode


@dataclass(frozen=True)
class HFlip:
    """A horizontal flip (drawn: RandomHorizontalFlip flipped this image)."""


@dataclass(frozen=True)
class Jitter:
    """ColorJitter as drawn: the order of its four adjustments and their factors (None: that one is off)."""

    order: list[int]
    factors: tuple[float | None, ...]  # brightness, contrast, saturation, hue


@dataclass(frozen=True)
class Resize:
    size: list[int]
    interpolation: Any  # torchvision's InterpolationMode


@dataclass(frozen=True)
class CenterCrop:
    size: list[int]


Step = ResizedCrop | HFlip | Jitter | Resize | CenterCrop


@dataclass(frozen=True)
class DecodePlan:
    """What the device does with one image: decode `data` (a JPEG), turn it upright by its EXIF `orientation`,
    then replay `steps`, the augmentation drawn in the worker."""

    data: bytes
    orientation: int
    steps: list[Step]


def plan(data: bytes, transform: Callable, seed: int | None) -> DecodePlan | None:
    """What the device does with one image; None when the device decoder cannot take it (the caller decodes it on
    the CPU as before)."""
    try:
        img = Image.open(io.BytesIO(data))  # the header only: nothing is decoded
        fmt, mode, (w, h) = img.format, img.mode, img.size
        orientation = int(img.getexif().get(ORIENTATION, 1))
    except DECODE_ERRORS:
        return None
    if fmt != "JPEG" or mode not in DEVICE_MODES or orientation not in range(1, 9):
        return None
    if orientation >= 5:  # rotated by 90 degrees: the upright image is h x w
        w, h = h, w
    return DecodePlan(data=data, orientation=orientation, steps=draw(transform, w, h, seed))


def draw(transform: Callable, w: int, h: int, seed: int | None) -> list[Step]:
    """The random parameters `transform` would draw for an upright w x h image under `seed` (as seeding.seeded
    seeds it), as a list of steps to replay."""
    return seeded(lambda size: _draw(transform, *size), (w, h), seed) if seed is not None else _draw(transform, w, h)


def _draw(transform: Callable, w: int, h: int) -> list[Step]:
    steps: list[Step] = []
    for op in getattr(transform, "transforms", [transform]):
        if isinstance(op, RandomResizedCropAndInterpolation):
            # a tensor with no elements has the image's size: get_params reads only that
            i, j, ch, cw = op.get_params(torch.empty(0, h, w), op.scale, op.ratio)
            interpolation = random.choice(op.interpolation) if isinstance(op.interpolation, (tuple, list)) \
                else op.interpolation
            steps.append(ResizedCrop(i, j, ch, cw, list(op.size), interpolation))
            h, w = op.size
        elif isinstance(op, T.RandomHorizontalFlip):
            if torch.rand(1) < op.p:
                steps.append(HFlip())
        elif isinstance(op, T.ColorJitter):
            order, *factors = op.get_params(op.brightness, op.contrast, op.saturation, op.hue)
            steps.append(Jitter(order.tolist(), tuple(None if f is None else float(f) for f in factors)))
        elif isinstance(op, (T.Resize, v2.Resize)):
            steps.append(Resize(list(op.size) if isinstance(op.size, (list, tuple)) else [op.size], op.interpolation))
        elif isinstance(op, (T.CenterCrop, v2.CenterCrop)):
            steps.append(CenterCrop(list(op.size)))
    return steps


def upright(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a CHW tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation in (2, 4):
        return x.flip(-1 if orientation == 2 else -2)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation in (5, 7):  # transpose / transverse
        x = x.transpose(-2, -1)
        return x if orientation == 5 else x.flip(-2, -1)
    if orientation in (6, 8):  # the stored image is rotated: 6 turns it 90 clockwise, 8 counter-clockwise
        return torch.rot90(x, -1 if orientation == 6 else 1, dims=(-2, -1))
    return x


_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def replay(x: torch.Tensor, steps: list[Step]) -> torch.Tensor:
    """Run one image's planned steps on its upright uint8 CHW tensor (on whatever device it is)."""
    for step in steps:
        if isinstance(step, ResizedCrop):
            box = x[:, step.top:step.top + step.height, step.left:step.left + step.width]
            x = F.resize(box, step.size, interpolation=step.interpolation, antialias=True)
        elif isinstance(step, HFlip):
            x = x.flip(-1)
        elif isinstance(step, Jitter):
            for fn in step.order:
                factor = step.factors[fn]
                if factor is not None:
                    x = _JITTER[fn](x, factor)
        elif isinstance(step, Resize):
            x = F.resize(x, step.size, interpolation=step.interpolation, antialias=True)
        elif isinstance(step, CenterCrop):
            x = F.center_crop(x, step.size)
    return x


class BatchDecoder:
    """Turns a loader batch of plans (and CPU-decoded fallbacks) into the batch of pixels on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_device = 0  # images decoded on the device
        self.fallback = 0  # images the CPU decoded instead (in the workers or here)

    def __call__(self, batch: Batch) -> Batch:
        parts = batch.parts
        if parts is None:
            return batch
        planned = [k for k, p in enumerate(parts) if isinstance(p, DecodePlan)]
        decoded = self._decode([parts[k] for k in planned])
        pixels: list[torch.Tensor | None] = list(parts)
        for k, x in zip(planned, decoded):
            pixels[k] = x
        self.fallback += batch.n_fallback
        kept = [(k, x) for k, x in enumerate(pixels) if x is not None]
        keep = [k for k, _ in kept]
        return dataclasses.replace(
            batch, parts=None, n_fallback=0, n_bad=batch.n_bad + len(pixels) - len(keep), labels=batch.labels[keep],
            keys=[batch.keys[k] for k in keep],
            pixel_values=torch.stack([x.to(self.device, non_blocking=True) for _, x in kept]) if keep else None)

    def _decode(self, plans: list[DecodePlan]) -> list[torch.Tensor | None]:
        if not plans:
            return []
        datas = [torch.frombuffer(bytearray(p.data), dtype=torch.uint8) for p in plans]
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, ValueError):  # one file the decoder rejects fails the batch: decode one by one
            images = [self._one(d) for d in datas]
        out = []
        for p, img in zip(plans, images):
            if img is None:  # the device decoder rejected it: PIL, upright already
                cpu = decode(p.data)
                self.fallback += 1
                out.append(None if cpu is None else replay(F.pil_to_tensor(cpu), p.steps))
                continue
            self.on_device += 1
            out.append(replay(upright(img, p.orientation), p.steps))
        return out

    def _one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, ValueError):
            return None

    def take_counts(self) -> tuple[int, int]:
        """(decoded on the device, decoded on the CPU instead) since the last call."""
        counts, self.on_device, self.fallback = (self.on_device, self.fallback), 0, 0
        return counts


def describe_counts(decoders: list[BatchDecoder]) -> str:
    """One log line: where this process's images were decoded since the last call (then the counts restart)."""
    on_device, fallback = (sum(c) for c in zip(*(d.take_counts() for d in decoders)))
    return (f"decoded {on_device} images on {decoders[0].device}, {fallback} on the CPU (not JPEG, CMYK or another "
            "mode, or rejected by the device decoder)")
