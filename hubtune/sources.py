"""Where a model comes from: the one parser of `--model` values and `from_pretrained` sources.

A spec is `local-dir:PATH`, an existing directory (or a path starting with `.`, `/` or `~`), a Hub repo
(`org/name`, `hf-hub:org/name`, either with `@revision`), or a timm architecture name (`resnet50`,
`resnet50.a1_in1k`). Light on purpose: the CLI, the card and the classifier parse specs without importing torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from hubtune.errors import ModelSourceError
from hubtune.files import WEIGHTS_FILE

HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"
# git's rules for a branch or tag name (git check-ref-format): no "..", "//", "@{", no part that starts with "." or
# ends with ".lock", no control character, space or ~^:?*[\, not "@", not ending in "/" or "."
REVISION = re.compile(r"^(?!@$)(?![/.])(?!.*(?:\.\.|//|@\{|/\.|\.lock(?:/|$)))[^\x00-\x20\x7f~^:?*\[\\]+(?<![/.])$")
PICKLED_SUFFIXES = (".bin", ".pth", ".pt", ".pth.tar", ".ckpt")


T = TypeVar("T")


def _given(value: T | None, problem: str) -> T:
    if value is None:
        raise ModelSourceError(problem)
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: exactly one of `path` (local), `repo_id` (Hub) or `name` (timm architecture) is set."""

    kind: Literal["local", "hub", "timm"]
    spec: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    name: str | None = None

    # the field of this spec's kind, for callers that checked `kind` (a ModelSourceError for another kind)
    @property
    def local_path(self) -> Path:
        return _given(self.path, f"{self.spec!r} is not a local model directory")

    @property
    def hub_repo_id(self) -> str:
        return _given(self.repo_id, f"{self.spec!r} is not a Hub repo id (org/name, hf-hub:org/name[@rev])")

    @property
    def arch_name(self) -> str:
        return _given(self.name, f"{self.spec!r} is not a timm architecture name")

    @property
    def timm_name(self) -> str:
        """The name `timm.create_model` understands."""
        if self.kind == "local":
            return f"{LOCAL_PREFIX}{self.path}"
        if self.kind == "hub":
            return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.name)


def is_local(source: str | Path) -> bool:
    """Whether `source` names something on this machine rather than a Hub repo: a Path, an existing file or folder,
    or text written as a path (starting with `.`, `/`, `~` or `\\`), which is never a Hub id. The one answer for
    --model, --dataset, `hubtune checkpoints` and the other sources; the caller reads the rest as a Hub id (or a timm
    name)."""
    if isinstance(source, Path):
        return True
    text = source.strip()
    return text.startswith((".", "/", "~", "\\")) or (bool(text) and Path(text).expanduser().exists())


def is_hub_id(source: str | Path) -> bool:
    """Whether `source` reads as a Hub repo id: not local (`is_local`) and `org/name`, one slash."""
    return not is_local(source) and str(source).count("/") == 1


def is_commit(revision: str | None) -> bool:
    """Whether `revision` names a commit (a full 40-digit sha) rather than a branch or tag."""
    return revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def parse_model_spec(spec: str | Path, revision: str | None = None) -> ModelSpec:
    """Parse a model spec; `revision` is the separately given one (`--model-revision`, `revision=`).

    Raises:
        ModelSourceError: the spec is empty, names two different revisions, or is not `org/name` shaped.
    """
    if isinstance(spec, Path):
        return ModelSpec("local", str(spec), path=spec.expanduser())
    text = spec.strip()
    if not text:
        raise ModelSourceError("the model spec is empty: give a timm architecture, a Hub id org/name or a directory")
    if text.startswith(LOCAL_PREFIX):
        return ModelSpec("local", spec, path=Path(text[len(LOCAL_PREFIX):]).expanduser())
    if not text.startswith(HUB_PREFIX) and is_local(text):
        return ModelSpec("local", spec, path=Path(text).expanduser())
    if not text.startswith(HUB_PREFIX) and "/" not in text:
        return ModelSpec("timm", spec, name=text)
    repo_id, _, at_revision = text.removeprefix(HUB_PREFIX).partition("@")
    if at_revision and revision and at_revision != revision:
        raise ModelSourceError(f"{spec!r} names revision {at_revision!r} but revision={revision!r} was also given")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelSourceError(f"{spec!r} is neither an existing local directory nor a Hub repo id "
                               "(org/name, hf-hub:org/name[@rev])")
    problem = repo_id_problem(repo_id) or revision_problem(at_revision or revision or None)
    if problem:
        raise ModelSourceError(f"{spec!r}: {problem}; expected org/name[@revision] or an existing local directory")
    return ModelSpec("hub", spec, repo_id=repo_id, revision=at_revision or revision or None)


def repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse `repo_id` (huggingface_hub's own rules: ".." or "." as a name, a host, ...); None
    when it is a valid repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err).split(" Use `repo_type`")[0].removesuffix(".")
    return None


def revision_problem(revision: str | None) -> str | None:
    """Why `revision` cannot be a branch, tag or commit name (git's ref rules); None when it can be (or is None)."""
    if revision is None or REVISION.fullmatch(revision):
        return None
    return (f"{revision!r} is not a valid branch, tag or commit name (no '..', no part starting with '.', no spaces "
            "or ~^:?*[\\)")


SAFETENSORS_ONLY = ("hubtune trains only from safetensors weights; convert them (timm.models.save_for_hf(model, dir, "
                    "safe_serialization=True)) or start from a timm architecture with --no-pretrained")
TRUST_REMEDY = ("hubtune loads only safetensors unless told to trust the source (trust_pickled_weights=True, CLI: "
                "--trust-pickled-weights)")


def check_weight_files(files: Sequence[str], where: str, trust_pickled_weights: bool = False,
                       remedy: str = TRUST_REMEDY) -> list[str]:
    """The top-level weight files timm may load from `files`; pickled ones only when trusted.

    timm picks `model.safetensors` before any other file, so its presence makes the load safe whatever else is there.

    Raises:
        ModelSourceError: there are no weights, or only pickled ones and they are not trusted.
    """
    top = [f for f in files if "/" not in f and f.endswith((".safetensors", *PICKLED_SUFFIXES))]
    if WEIGHTS_FILE in top:
        return [WEIGHTS_FILE]
    pickled = sorted(f for f in top if f.endswith(PICKLED_SUFFIXES))
    if pickled and not trust_pickled_weights:
        raise ModelSourceError(
            f"{where} has no {WEIGHTS_FILE}, only pickled weights ({', '.join(pickled)}), which can run code when "
            f"loaded; {remedy}"
        )
    if not top:
        raise ModelSourceError(f"{where} has no weights: expected {WEIGHTS_FILE} (as written by hubtune and timm)")
    return sorted(top)


def loadable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A timm config.json that transformers loads too: timm >= 1.0.31 repeats `num_classes` in `model_args`, and
    transformers' TimmWrapper, which passes num_classes itself, then fails ("got multiple values for keyword argument
    'num_classes'"). timm reads the class count from the root `num_classes`, so nothing is lost."""
    model_args = config.get("model_args")
    if not isinstance(model_args, dict) or "num_classes" not in model_args:
        return config
    return {**config, "model_args": {k: v for k, v in model_args.items() if k != "num_classes"}}
