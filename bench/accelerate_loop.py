"""The comparison training loop: plain Accelerate, written the way accelerate's examples/cv_example.py does it.

cv_example: a map-style dataset with a torchvision transform, `DataLoader(shuffle=True, num_workers=...)`, a timm
model, `requires_grad = False` on the frozen parameters, `accelerator.prepare(model, optimizer, dataloader,
scheduler)`, then forward -> cross_entropy -> accelerator.backward -> optimizer.step -> lr_scheduler.step ->
zero_grad. Differences, for a like-for-like comparison with hubtune: the data is the same parquet files read with
`datasets.load_dataset` + `with_transform` (the Pets example reads JPEG files), the transforms are timm's usual
per-image ones for the model's data config (`timm.data.create_transform(**cfg, is_training=True)`: the same crop,
flip and colour jitter as hubtune, ending in ToTensor + Normalize in the loader workers, where hubtune ships uint8
and normalizes whole batches in the main process), and the optimizer is AdamW (hubtune's default; cv_example uses
Adam). Frozen BatchNorm layers stay in train mode, as in cv_example.

Also a script: `python bench/accelerate_loop.py --data DIR ...` prints `step N` lines (time to first step).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable


def make_loader(files: list[str], transform: Callable, batch_size: int, num_workers: int) -> Any:
    import datasets
    import torch

    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train")

    def tf(batch: dict) -> dict:
        return {"image": [transform(img.convert("RGB")) for img in batch["image"]], "label": batch["labels"]}

    def collate(examples: list[dict]) -> dict:
        return {"image": torch.stack([e["image"] for e in examples]),
                "label": torch.tensor([e["label"] for e in examples])}

    return torch.utils.data.DataLoader(ds.with_transform(tf), shuffle=True, batch_size=batch_size,
                                       num_workers=num_workers, collate_fn=collate)


def train_steps(files: list[str], *, image_size: int, batch_size: int, steps: int, mixed_precision: str = "no",
                frozen: list[str] | None = None, num_workers: int = 2, lr: float = 5e-4,
                on_step: Callable[[int], None] | None = None) -> list[float]:
    """Run `steps` optimizer steps; return the perf_counter time at the end of each step."""
    import timm
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from timm.data import create_transform, resolve_data_config
    from torch.optim.lr_scheduler import OneCycleLR

    AcceleratorState._reset_state(reset_partial_state=True)  # several runs with different precisions, one process
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    # the usual path: per-image float tensors, normalized in the loader workers (not hubtune's uint8 + batch step)
    train_tf = create_transform(**resolve_data_config({"input_size": (3, image_size, image_size)}, model=model),
                                is_training=True)
    train_dataloader = make_loader(files, train_tf, batch_size, num_workers)
    model = model.to(accelerator.device)
    frozen_names = set(frozen or [])
    for name, param in model.named_parameters():
        if name in frozen_names:
            param.requires_grad = False
    optimizer = torch.optim.AdamW(params=[p for p in model.parameters() if p.requires_grad], lr=lr / 25,
                                  weight_decay=0.05)
    lr_scheduler = OneCycleLR(optimizer=optimizer, max_lr=lr, epochs=1, steps_per_epoch=len(train_dataloader))
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    times = []
    model.train()
    for step, batch in enumerate(train_dataloader):
        outputs = model(batch["image"])
        loss = F.cross_entropy(outputs, batch["label"])
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
        if on_step is not None:
            on_step(step + 1)
        if step + 1 >= steps:
            break
    del train_dataloader
    gc.collect()  # the abandoned loader iterator: stop its workers before the next run
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plain Accelerate training loop (cv_example style)")
    parser.add_argument("--data", required=True, help="directory of parquet files")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no")
    args = parser.parse_args(argv)
    files = sorted(str(p) for p in Path(args.data).glob("*.parquet"))
    train_steps(files, image_size=args.image_size, batch_size=args.batch_size, steps=args.steps,
                mixed_precision=args.mixed_precision, num_workers=args.num_workers,
                on_step=lambda s: print(f"step {s}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
