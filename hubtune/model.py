"""The timm backbone: creation from any source, preprocessing, partial freezing, parameter tables, export."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
import torchvision.transforms as T
from timm.data import create_transform, resolve_data_config
from timm.layers import FrozenBatchNormAct2d
from timm.utils.model import freeze as timm_freeze
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import v2

from hubtune.errors import ConfigError, ModelSourceError, did_you_mean
from hubtune.files import MODEL_CONFIG_FILE
from hubtune.sources import SAFETENSORS_ONLY, check_weight_files, loadable_config, parse_model_spec

HEAD_GROUP = "head"
FROZEN_BN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)


class TimmModel(Protocol):
    """What every timm model has beyond nn.Module: timm defines it on each model class (and create_model sets
    `pretrained_cfg`), not on a base class its types could name."""

    pretrained_cfg: dict[str, Any]
    num_classes: int

    def get_classifier(self) -> torch.nn.Module: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]: ...


def as_timm(model: torch.nn.Module) -> TimmModel:
    """`model`, a timm model, seen through the interface timm models share (see TimmModel): timm.create_model is
    typed as returning a plain nn.Module."""
    return cast(TimmModel, model)


def timm_name(spec: str) -> str:
    """The name timm.create_model understands for a --model value."""
    return parse_model_spec(spec).timm_name


def _check_architecture(name: str, pretrained: bool) -> None:
    """Raise ModelSourceError unless timm knows the architecture (and, for pretrained weights, the tag); the message
    suggests the closest names timm knows (arch.tag names when a tag was given), or how to list them."""
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = tag and did_you_mean(name.lower(), timm.list_models(pretrained=True))
        close = close or did_you_mean(arch.lower(), timm.list_models())
        raise ModelSourceError(f"--model {name!r} is not a timm architecture, Hub id (org/name) or local-dir:PATH"
                               + (close or "; list the architectures with timm.list_models('resnet*') (any glob)"))
    tags = [t.split(".", 1)[1] for t in timm.models.get_arch_pretrained_cfgs(arch)]
    if tag and tag not in tags:
        raise ModelSourceError(f"--model {name!r} is not a timm architecture: {arch} has no pretrained tag {tag!r} "
                               f"(tags: {', '.join(tags) or 'none'})"
                               + did_you_mean(name.lower(), [f"{arch}.{t}" for t in tags]))


def create(spec: str, num_classes: int | None, pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """Build the model through timm.create_model with a classifier sized for `num_classes`.

    Raises:
        ModelSourceError: the model does not exist (as an architecture, on the Hub, or at the local path).
    """
    from hubtune.hub import model_repo_errors

    parsed = parse_model_spec(spec)
    if parsed.kind == "timm":
        _check_architecture(parsed.arch_name, pretrained)
    if parsed.kind == "local" and not (parsed.local_path / MODEL_CONFIG_FILE).is_file():
        raise ModelSourceError(f"--model {spec!r}: {parsed.path} is not a model directory (no {MODEL_CONFIG_FILE}); "
                               "give a directory written by hubtune or timm.save_for_hf, a Hub id or a timm architecture")
    if parsed.kind == "local" and pretrained:
        check_weight_files([p.name for p in parsed.local_path.iterdir()], f"--model {spec!r}", remedy=SAFETENSORS_ONLY)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with model_repo_errors(spec):
        return timm.create_model(parsed.timm_name, pretrained=pretrained, **kwargs)


def data_config(model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    """The backbone's own preprocessing (pretrained_cfg), at `image_size` when given."""
    args = {"input_size": (3, image_size, image_size)} if image_size else None
    return resolve_data_config(args, model=model)


def transforms(cfg: dict[str, Any], auto_augment: str | None = None) -> tuple[Callable, Callable]:
    """timm's (train, eval) transforms for this data config, ending in uint8 CHW tensors; see `Normalize`.

    `auto_augment` is timm's --aa policy (RandAugment, AugMix, AutoAugment), which replaces color jitter as in timm.

    These are timm's prefetcher transforms (its PrefetchLoader normalizes on the device): loader workers skip the
    per-image float conversion and ship 4x fewer bytes. The eval resize/crop runs on the uint8 tensor, where
    torch's antialiased kernels are about 2x faster than PIL's and agree with them to within 2/255 (rounding).
    """
    try:
        train = create_transform(**cfg, is_training=True, use_prefetcher=True, auto_augment=auto_augment)
    except (AssertionError, KeyError, ValueError, IndexError) as err:  # timm's parsers assert on what they reject
        raise ConfigError(f"--aa {auto_augment!r} is not a policy timm accepts ({err or type(err).__name__}); e.g. "
                          "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original-mstd0.5, v0") from err
    return train, _resize_as_tensor(create_transform(**cfg, is_training=False, use_prefetcher=True))


def _resize_as_tensor(tf: Callable) -> Callable:
    """Move the to-tensor step of a Resize/CenterCrop pipeline to the front (other pipelines stay as they are)."""
    ops = list(getattr(tf, "transforms", []))
    if not ops or type(ops[-1]).__name__ != "MaybePILToTensor":
        return tf
    if not all(type(op) in (T.Resize, T.CenterCrop) and getattr(op, "antialias", True) for op in ops[:-1]):
        return tf
    # transforms.v2 resizes uint8 with torch's integer kernels; v1 would convert every image to float first
    v2_ops = [v2.Resize(op.size, op.interpolation, op.max_size, antialias=True) if isinstance(op, T.Resize)
              else v2.CenterCrop(op.size) for op in ops[:-1]]
    return T.Compose([ops[-1], *v2_ops])


def resize_size(tf: Callable) -> int | None:
    """The shorter side a transform resizes to before cropping (None when it does not start that way)."""
    for op in getattr(tf, "transforms", []):
        if isinstance(op, (T.Resize, v2.Resize)):
            size = op.size
            return size if isinstance(size, int) else (size[0] if len(size) == 1 else min(size))
    return None


def default_channels_last(device: torch.device) -> bool:
    """--channels-last when it is not given: on for CUDA, where convolutions in channels_last run faster (1.8x
    measured for resnet50 bf16 on an H200), off on the CPU and elsewhere."""
    return device.type == "cuda"


class Normalize:
    """uint8 batches to normalized float on the device: timm PrefetchLoader's step, for hubtune's dict batches.

    As in timm, the mean and std are scaled by 255 so a batch takes two passes; the floats differ from per-image
    ToTensor + Normalize only by rounding (~1e-7).
    """

    def __init__(self, cfg: dict[str, Any], device: torch.device, channels_last: bool = False) -> None:
        self.device = device
        self.mean = torch.tensor([255 * x for x in cfg["mean"]], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * x for x in cfg["std"]], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)


def _matchers(model: torch.nn.Module) -> dict[str, list[re.Pattern]]:
    """timm's coarse group_matcher as {group kind: regexes}."""
    out: dict[str, list[re.Pattern]] = {}
    for kind, spec in as_timm(model).group_matcher(coarse=True).items():
        patterns = [spec] if isinstance(spec, str) else [p for p, _ in spec]
        out[kind] = [re.compile(p) for p in patterns]
    return out


def param_groups(model: torch.nn.Module) -> dict[str, str]:
    """Map every parameter name to its group: stem, stages.N (timm's blocks, 0-based), or head."""
    head = as_timm(model).pretrained_cfg.get("classifier", "")
    heads = [head] if isinstance(head, str) else list(head)
    matchers = _matchers(model)
    stage_ids: dict[str, str] = {}
    groups = {}
    for name, _ in model.named_parameters():
        group = "other"
        if any(name == h or name.startswith(h + ".") for h in heads if h):
            group = HEAD_GROUP
        else:
            for kind, patterns in matchers.items():
                m = next((m for p in patterns if (m := p.match(name))), None)
                if m is None:
                    continue
                if kind == "stem" or not m.groups():
                    group = kind
                else:
                    stage_ids.setdefault(m.group(1), "")
                    group = f"stages.{m.group(1)}"
                break
        groups[name] = group
    # timm numbers blocks by their module index (resnet layer1..4): renumber stages 0..N-1 in order
    order = {raw: i for i, raw in enumerate(sorted(stage_ids, key=lambda s: int(s) if s.isdigit() else s))}
    return {n: f"stages.{order[g[7:]]}" if g.startswith("stages.") else g for n, g in groups.items()}


def _expand(token: str) -> list[str]:
    """'stages.0-2' -> ['stages.0', 'stages.1', 'stages.2']; 'blocks' is an alias of 'stages'."""
    token = re.sub(r"^blocks(?=\.|$)", "stages", token)
    m = re.fullmatch(r"stages\.(\d+)-(\d+)", token)
    if m:
        return [f"stages.{i}" for i in range(int(m.group(1)), int(m.group(2)) + 1)]
    return [token]


def _freeze_candidates(token: str, group_names: list[str], params: Iterable[str]) -> list[str]:
    """What a --freeze token that matched nothing may have meant: a group or module name, or for a glob the same
    glob on a real module name (`layr1.*` -> `layer1.*`); nothing for a glob that starts with a wildcard."""
    names = {p.rsplit(".", i)[0] for p in params for i in range(p.count(".") + 1)}  # modules, parameters
    wild = re.search(r"[*?\[]", token)
    if wild is None:
        return list(dict.fromkeys([*group_names, "stages", *sorted(names)]))  # a group may share a module's name
    head, tail = token[:wild.start()], token[wild.start():]
    sep = "." if head.endswith(".") else ""
    return sorted(f"{n}{sep}{tail}" for n in names) if head else []


def resolve_freeze(model: torch.nn.Module, spec: str) -> list[str]:
    """Module names to freeze for a --freeze spec (group names and module-name globs).

    Raises:
        ConfigError: a token matches nothing, or would freeze the classifier without naming it.
    """
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    groups = param_groups(model)
    group_names = sorted(set(groups.values()))
    modules = [n for n, _ in model.named_modules() if n]
    head_params = {n for n, g in groups.items() if g == HEAD_GROUP}
    chosen: set[str] = set()
    problems = []
    stages = sorted((g for g in group_names if g.startswith("stages.")), key=lambda g: int(g.split(".")[1]))
    for token in tokens:
        params: set[str] = set()
        outside = [item for item in _expand(token) if item.startswith("stages.") and item not in group_names]
        if outside and len(_expand(token)) > 1:  # a range must lie within the stages that exist, not be clamped
            valid = f"stages.0-{len(stages) - 1}" if stages else "none"
            problems.append(f"--freeze {token!r} reaches past the model's stages ({', '.join(outside[:3])}"
                            f"{' ...' if len(outside) > 3 else ''} do not exist); valid range: {valid}")
            continue
        for item in _expand(token):
            if item == "stages":
                params |= {n for n, g in groups.items() if g.startswith("stages.")}
            elif item in group_names:
                params |= {n for n, g in groups.items() if g == item}
            else:
                params |= {p for p in groups for mod in modules if fnmatch.fnmatchcase(mod, item) and p.startswith(mod + ".")}
                params |= {p for p in groups if fnmatch.fnmatchcase(p, item)}
        if not params:
            problems.append(
                f"--freeze {token!r} matches no parameters; groups: {', '.join(group_names)}; "
                f"or a module-name glob such as {modules[0]}*"
                + did_you_mean(_expand(token)[0], _freeze_candidates(token, group_names, groups))
            )
        explicit_head = token == HEAD_GROUP or token in {n.rsplit(".", 1)[0] for n in head_params}
        if params & head_params and not explicit_head:
            problems.append(
                f"--freeze {token!r} would freeze the classifier head; name it explicitly ('{HEAD_GROUP}') to do that"
            )
        chosen |= params
    if problems:
        raise ConfigError("\n".join(problems))
    return sorted(chosen)


def freeze(model: torch.nn.Module, param_names: list[str], freeze_bn: bool) -> None:
    """Freeze the given parameters with timm's freeze utility; with `freeze_bn`, fix the frozen BatchNorms too.

    Fixed BatchNorms stay BatchNorm modules held in eval mode (see `fix_statistics`): one fused kernel with the
    running statistics, where FrozenBatchNorm2d takes two elementwise passes (about 2x slower on the CPU here).
    """
    chosen = set(param_names)
    owners = sorted({n.rsplit(".", 1)[0] for n in param_names})
    whole = [m for m in owners if all(n in chosen for n, _ in model.get_submodule(m).named_parameters(m))]
    if whole:
        timm_freeze(model, whole, include_bn_running_stats=False)
    params = dict(model.named_parameters())
    for name in param_names:
        if name in params:
            params[name].requires_grad_(False)
    if freeze_bn:
        for name, module in model.named_modules():
            own = [f"{name}.{n}" for n, _ in module.named_parameters()]
            if isinstance(module, _BatchNorm) and own and all(n in chosen for n in own):
                fix_statistics(module)


def fix_statistics(bn: torch.nn.Module) -> None:
    """Keep a BatchNorm in eval mode (running statistics, no updates) whatever model.train() later says."""
    vars(bn)["train"] = types.MethodType(_stay_in_eval, bn)  # this module's own, over nn.Module.train
    bn.eval()


def unfix_statistics(bn: torch.nn.Module, training: bool) -> None:
    """Undo `fix_statistics`: the BatchNorm follows model.train()/eval() again, starting in `training` mode."""
    if getattr(bn.train, "__func__", None) is _stay_in_eval:
        del bn.train
    torch.nn.Module.train(bn, training)


def unprepared(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with the forward it had before Accelerate patched in autocast, so that preparing it again (a new DDP
    wrapper) does not nest a second autocast."""
    if "_original_forward" in vars(net):
        net.forward = vars(net).pop("_original_forward")
    return net


def _stay_in_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(self, False)


def has_fixed_statistics(module: torch.nn.Module) -> bool:
    """A BatchNorm fixed by `fix_statistics`, or a FrozenBatchNorm."""
    return isinstance(module, FROZEN_BN) or getattr(module.train, "__func__", None) is _stay_in_eval


def counted_parameters(module: torch.nn.Module, recurse: bool = True) -> list[tuple[int, bool]]:
    """(numel, trainable) of each parameter, counting the affine weights that FrozenBatchNorm keeps as buffers."""
    out = [(p.numel(), p.requires_grad) for p in module.parameters(recurse=recurse)]
    frozen_bn = [m for m in (module.modules() if recurse else [module]) if isinstance(m, FROZEN_BN)]
    out += [(m.get_buffer("weight").numel() + m.get_buffer("bias").numel(), False) for m in frozen_bn]
    return out


def parameter_table(model: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    """(group, total, trainable, frozen) per top-level module, plus a total row."""
    rows: list[tuple[str, int, int, int]] = []
    for name, child in model.named_children():
        counted = counted_parameters(child)
        total = sum(n for n, _ in counted)
        if total == 0:
            continue
        trainable = sum(n for n, t in counted if t)
        rows.append((name, total, trainable, total - trainable))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    return rows


def format_table(rows: list[tuple[str, int, int, int]]) -> str:
    lines = [f"{'group':<16}{'total':>14}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{g:<16}{t:>14,}{tr:>14,}{fr:>14,}" for g, t, tr, fr in rows]
    return "\n".join(lines)


def export(model: torch.nn.Module, out_dir: str | Path, label_names: list[str], data_cfg: dict[str, Any],
           temperature: float | None = None) -> None:
    """Write config.json + model.safetensors in timm's Hub format: plain timm.create_model loads it, and so do
    transformers' AutoModelForImageClassification and pipeline("image-classification") (TimmWrapper).

    A `temperature` (--calibrate) goes into config.json at the top level, which only hubtune reads: timm and
    transformers load the same weights and ignore it."""
    if any(not t.is_contiguous() for t in model.state_dict().values()):  # --channels-last; safetensors needs
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # contiguous tensors
    timm.models.save_for_hf(
        model, str(out_dir), model_config={"label_names": list(label_names)}, safe_serialization=True,
        data_config={k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                     if k in data_cfg},
    )
    path = Path(out_dir) / MODEL_CONFIG_FILE
    config = loadable_config(json.loads(path.read_text()))
    if temperature is not None:
        config["temperature"] = temperature
    path.write_text(json.dumps(config, indent=2))
