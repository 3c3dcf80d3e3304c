"""--cache-features: backbone features computed once, then the classifier trains on them (linear probing).

With every parameter outside the classifier frozen, BatchNorm fixed and no dropout before the classifier, the
backbone maps an image to the same features in every epoch, so they are computed in the first pass over each
view and looked up by image content afterwards. The stream then replays the epoch in the same order without
decoding anything (hubtune.stream, `images=False`), and each step runs only the classifier: the batches, the
features and so the results are those of the uncached run.

A view is what the backbone sees: the eval transform (without augmentation, and for validation), or augmented
view v, the augmentation an uncached run draws in epoch v; epoch e trains on view e mod --cache-views.
Tables live under a fingerprint of everything that changes features (model, its weights and revision,
transforms, image size, dataset and its revision, precision and versions), one safetensors file per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hubtune import model as model_lib
from hubtune.errors import ConfigError
from hubtune.files import atomic_write

if TYPE_CHECKING:
    from hubtune.stream import Batch

logger = logging.getLogger("hubtune")

FORMAT = 1
STOCHASTIC = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, timm.layers.DropPath)


def default_dir() -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "hubtune" / "features"


def check_cacheable(net: torch.nn.Module) -> None:
    """Raise ConfigError unless the backbone output cannot change: only the classifier trains, nothing is random."""
    classifier = {id(p) for p in model_lib.as_timm(net).get_classifier().parameters()}
    trainable = [name for name, p in net.named_parameters() if p.requires_grad and id(p) not in classifier]
    if trainable:
        shown = ", ".join(trainable[:3]) + (f" and {len(trainable) - 3} more" if len(trainable) > 3 else "")
        raise ConfigError(f"--cache-features trains only the classifier, but {len(trainable)} other parameters are "
                         f"trainable ({shown}); freeze them with --freeze (e.g. every group but the head)")
    inside = {id(m) for m in model_lib.as_timm(net).get_classifier().modules()}
    for name, module in net.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not model_lib.has_fixed_statistics(module):
            raise ConfigError(f"--cache-features needs fixed BatchNorm statistics ({name} is a {type(module).__name__}"
                             f" that updates in training); add --freeze-bn")
        p = getattr(module, "p", None) if not isinstance(module, timm.layers.DropPath) else module.drop_prob
        if isinstance(module, STOCHASTIC) and p:
            raise ConfigError(f"--cache-features needs a deterministic backbone, but {name} drops with "
                             f"p={p}; create the model without drop_rate/drop_path_rate")


def weights_digest(net: torch.nn.Module) -> str:
    """A digest of every tensor the backbone computes with (the classifier excluded)."""
    skip = {id(t) for t in model_lib.as_timm(net).get_classifier().state_dict(keep_vars=True).values()}
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(net.state_dict(keep_vars=True).items()):
        if id(t) in skip:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """The run's settings that change the features, as the config declares them (its "cache_key" fields), and the
    augmentation's seed (None without --augment: the eval transform draws nothing)."""

    settings: dict[str, Any]
    augment_seed: int | None


def fingerprint(key: CacheKey, net: torch.nn.Module, data_cfg: dict, train_tf: Callable, eval_tf: Callable) -> dict:
    """Everything the cached features depend on; its hash names the cache folder."""
    return {
        **key.settings,
        "format": FORMAT, "weights": weights_digest(net), "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in data_cfg.items()},
        "train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
        "seed": key.augment_seed,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def view_for(views: int | None, epoch: int) -> str:
    """The cached view epoch `epoch` trains on: one of `views` augmented views (--cache-views with --augment), or
    the unaugmented one (None)."""
    return f"train-view{epoch % views}" if views is not None else "train"


class FeatureCache:
    """Per-view tables {image content key: pre-logits features}, written by a full pass, replayed afterwards.

    A key missing from a complete table is an undecodable image: the replay skips and counts it as the image pass did.
    """

    def __init__(self, root: Path, spec: dict, rank: int, world_size: int) -> None:
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.tables: dict[str, dict[int, torch.Tensor]] = {}
        self.complete: set[str] = set()  # views whose table holds every example of the pass
        self.computing: dict[str, bool] = {}  # view -> this pass computes it from its very first example

    def _load(self, view: str) -> bool:
        """Load a view that an earlier pass wrote completely (with any process count)."""
        folder = self.dir / view
        for done in sorted(folder.glob("complete-of-*.json")) if folder.is_dir() else []:
            n = int(done.stem.rsplit("-", 1)[1])
            try:
                parts = [load_file(str(folder / f"part-{r}-of-{n}.safetensors")) for r in range(n)]
            except (OSError, ValueError, SafetensorError) as err:  # a missing or damaged part: compute it again
                logger.warning(f"feature cache {folder}: ignoring an unreadable part ({err})")
                continue
            self.tables[view] = {k % 2**64: f for t in parts for k, f in zip(t["keys"].tolist(), t["features"])}
            self.complete.add(view)
            return True
        return False

    def begin(self, view: str, stream: Any, accelerator: Any, fresh: bool = True) -> bool:
        """Set `stream` up to replay `view` from the cache (True) or to decode images and compute it (False).

        Every process takes the same decision. A pass that does not start at the first example (`fresh` False,
        a resumed epoch) still uses the cache when it can, but cannot complete it.
        """
        ready = view in self.complete or self._load(view)
        if accelerator.num_processes > 1:
            flag = torch.tensor([int(ready)], device=accelerator.device)
            ready = bool(accelerator.reduce(flag, "min").item())
        stream.images = not ready
        stream.known_keys = frozenset(self.tables[view]) if ready else frozenset()
        if not ready:
            self.tables[view] = {}
            self.computing[view] = fresh
        else:
            self.computing.pop(view, None)
        return ready

    def features(self, view: str, batch: Batch, compute: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        """The batch's features: computed from its images (and remembered) or looked up by content key."""
        if batch.pixel_values is not None:
            feats = compute(batch.pixel_values)
            self.tables[view].update(zip(batch.keys, feats.detach().float().cpu()))
            return feats
        table = self.tables[view]
        return torch.stack([table[k] for k in batch.keys]).to(device, non_blocking=True)

    def end(self, view: str, accelerator: Any, whole_pass: bool, rest: Iterable[Batch] = (),
            compute: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """After a pass: store the view if this pass computed all of it (every process writes its own part).

        `rest`: batches this process read but did not train on (processes stop together when the first runs out);
        their features are computed too, so the table covers the whole shard and a replay stops where this did.
        """
        computed_all = self.computing.pop(view, None) and whole_pass
        if computed_all and compute is not None:
            for batch in rest:
                if batch.pixel_values is not None:
                    self.features(view, batch, compute, accelerator.device)
        if accelerator.num_processes > 1:
            flag = torch.tensor([int(bool(computed_all))], device=accelerator.device)
            computed_all = bool(accelerator.reduce(flag, "min").item())
        if not computed_all:
            return
        self.complete.add(view)
        folder = self.dir / view
        table = self.tables[view]
        keys = torch.tensor([k if k < 2**63 else k - 2**64 for k in table], dtype=torch.int64)  # uint64 as int64
        feats = torch.stack(list(table.values())) if table else torch.zeros(0, 0)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"part-{self.rank}-of-{self.world_size}.safetensors",
                         lambda p: save_file({"keys": keys, "features": feats}, str(p)), fsync=False)
        except OSError as err:  # the run goes on from memory; a later run recomputes what is missing
            logger.warning(f"feature cache: could not store {view} in {folder} ({err}); later runs will recompute it")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # the view is complete once every part is on disk
            try:
                atomic_write(self.dir / "spec.json", json.dumps(self.spec, indent=1), fsync=False)
                atomic_write(folder / f"complete-of-{self.world_size}.json",
                             json.dumps({"processes": self.world_size}), fsync=False)
            except OSError as err:
                logger.warning(f"feature cache: could not mark {view} complete in {folder} ({err})")
        logger.info(f"feature cache: {view} computed ({len(table)} examples in this process), kept in {self.dir}")


def backbone_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier receives: timm's pre-logits features (pooled, after any head norm)."""
    timm_net = model_lib.as_timm(net)
    return timm_net.forward_head(timm_net.forward_features(x), pre_logits=True)
