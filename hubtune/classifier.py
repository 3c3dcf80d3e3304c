"""Inference with a trained classifier (timm Hub format) from a local directory or a Hub repo: `hubtune predict`.

torch, timm and huggingface_hub are imported inside the functions that use them: the CLI imports this module to
build its parser for every command, and huggingface_hub reads HF_ENDPOINT once, when it is first imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from hubtune import hub_calls
from hubtune.errors import ConfigError, ModelSourceError
from hubtune.files import MODEL_CONFIG_FILE as CONFIG_NAME
from hubtune.files import WEIGHTS_FILE as SAFE_WEIGHTS_NAME
from hubtune.sources import LOCAL_PREFIX, ModelSpec, check_weight_files, parse_model_spec

if TYPE_CHECKING:
    import torch

ImageInput = str | Path | bytes | Image.Image | Any  # also numpy arrays and torch tensors


def _hub_snapshot(repo_id: str, revision: str | None, token: str | None, cache_dir: str | Path | None,
                  trust_pickled_weights: bool) -> tuple[Path, str]:
    """Download config.json and the vetted weights of a Hub repo; (snapshot directory, commit sha).

    Raises:
        ValueError: the repo, revision or config.json does not exist, or the weights are refused.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from hubtune.hub import model_repo_errors
    from hubtune.version import __version__

    where = f"{repo_id}@{revision}" if revision else repo_id
    url = f"{constants.ENDPOINT}/{repo_id}"
    offline = constants.is_offline_mode()

    def download(filename: str, at: str | None) -> str:
        return hf_hub_download(repo_id, filename, revision=at, local_files_only=offline, token=token,
                               cache_dir=cache_dir, library_name="hubtune", library_version=__version__)

    try:
        with model_repo_errors(ModelSpec("hub", where, repo_id=repo_id, revision=revision), what=where):
            # config.json by the requested name first: that records the branch or tag in the cache for offline runs,
            # and its snapshot folder is named by the commit, which pins everything after it
            config = download(CONFIG_NAME, revision)
            folder, sha = Path(config).parent, Path(config).parent.name
            if offline:
                files = [p.name for p in folder.iterdir()]
            else:
                info = HfApi(token=token, library_name="hubtune", library_version=__version__).model_info(
                    repo_id, revision=sha)
                files = [s.rfilename for s in info.siblings or []]
    except LocalEntryNotFoundError as err:
        if not offline:
            raise hub_calls.unreachable(f"loading {where}", err) from err
        raise ModelSourceError(f"{where} is not in the local HF cache and HF_HUB_OFFLINE is set; download it first") from err
    except EntryNotFoundError as err:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelSourceError(f"{url} has no {CONFIG_NAME}{at}; it is not a timm/hubtune model repo") from err
    for name in check_weight_files(files, f"{url} (revision {sha[:12]})", trust_pickled_weights):
        download(name, sha)
    return folder, sha


def _load_local(folder: Path, where: str, trust_pickled_weights: bool) -> torch.nn.Module:
    """timm.create_model over a directory in timm's Hub format, after vetting its weight files."""
    import pickle

    import timm

    if not folder.is_dir():
        raise ModelSourceError(f"{where}: no such directory; give a model directory (config.json + {SAFE_WEIGHTS_NAME})"
                         " or a Hub repo id org/name")
    if not (folder / CONFIG_NAME).is_file():
        raise ModelSourceError(f"{where} has no {CONFIG_NAME}; expected a directory written by hubtune or timm.save_for_hf")
    check_weight_files([p.name for p in folder.iterdir() if p.is_file()], where, trust_pickled_weights)
    try:
        return timm.create_model(f"{LOCAL_PREFIX}{folder}", pretrained=True)
    except (RuntimeError, pickle.UnpicklingError, json.JSONDecodeError, KeyError) as err:
        raise ModelSourceError(f"{where}: timm {timm.__version__} cannot load this model: {err}") from err


class ImageClassifier:
    """A timm classifier in eval mode with its label names, eval preprocessing and softmax temperature."""

    def __init__(self, model: torch.nn.Module, source: str = "", revision: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 temperature: float | None = None) -> None:
        """Wrap a timm model; its pretrained_cfg supplies label names and preprocessing.

        Args:
            model: a timm classification model.
            source: where it came from (directory or Hub repo id), for messages.
            revision: the Hub commit sha it was loaded at; None for local directories.
            device: where to run; CUDA when available, else CPU, by default.
            dtype: the model's floating point type (torch.bfloat16, "float16", ...); float32 by default.
            temperature: divides the logits before the softmax (`hubtune train --calibrate` fits it); None: 1.

        Raises:
            ConfigError: the device or dtype is unknown, the label names do not match the number of classes, or the
                temperature is not a positive number.
        """
        import torch
        from timm.data import create_transform

        from hubtune.model import as_timm, data_config

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise ConfigError(f"device must be a torch device like 'cpu', 'cuda' or 'cuda:1', not {device!r}") from err
        self.dtype = _dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.source, self.revision = source, revision
        self.temperature = check_temperature(temperature, source or "model")
        num_classes, names = as_timm(model).num_classes, as_timm(model).pretrained_cfg.get("label_names")
        if names is not None and len(names) != num_classes:
            raise ConfigError(f"{source or 'model'}: {len(names)} label_names for {num_classes} classes in its config")
        self.label_names: list[str] = [str(n) for n in names] if names else [str(i) for i in range(num_classes)]
        self.data_config: dict[str, Any] = data_config(model, None)
        self.transform: Callable[[Image.Image], torch.Tensor] = create_transform(**self.data_config,
                                                                                 is_training=False)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | Path, revision: str | None = None, *,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        trust_pickled_weights: bool = False, token: str | None = None,
                        cache_dir: str | Path | None = None) -> ImageClassifier:
        """Load a classifier from a local directory or a Hub repo (`org/name`, `hf-hub:org/name[@rev]`).

        Args:
            repo_id_or_path: an existing directory (or `local-dir:PATH`), else a Hub model repo id.
            revision: Hub branch, tag or commit sha; the default branch when None.
            device: where to run; CUDA when available, else CPU, by default.
            dtype: the model's floating point type (torch.bfloat16, "float16", ...); float32 by default.
            trust_pickled_weights: allow pickled weights (pytorch_model.bin, *.pth) when there is no model.safetensors.
            token: Hub token for private or gated repos; HF_TOKEN or the stored login when None.
            cache_dir: Hugging Face cache directory for the download; the default cache when None.

        Raises:
            ValueError: the directory, repo, revision or config.json is missing, or the weights are refused.
        """
        spec = parse_model_spec(repo_id_or_path, revision)
        if spec.kind == "local":
            if revision is not None:
                raise ConfigError(f"revision={revision!r} applies to Hub repos only, not the directory {str(spec.path)!r}")
            return cls(_load_local(spec.local_path, str(spec.path), trust_pickled_weights), str(spec.path), None,
                       device, dtype, read_temperature(spec.local_path, str(spec.path)))
        if spec.kind == "timm":
            raise ModelSourceError(f"{repo_id_or_path!r} is neither an existing local directory nor a Hub repo id "
                                   "(org/name, hf-hub:org/name[@rev])")
        repo_id = spec.hub_repo_id
        folder, sha = _hub_snapshot(repo_id, spec.revision, token, cache_dir, trust_pickled_weights)
        where = f"{repo_id}@{sha[:12]}"
        return cls(_load_local(folder, where, trust_pickled_weights), repo_id, sha, device, dtype,
                   read_temperature(folder, where))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model in timm's Hub format (config.json + model.safetensors) with its labels and preprocessing."""
        from hubtune.model import export

        Path(folder).mkdir(parents=True, exist_ok=True)
        export(self.model, folder, self.label_names, self.data_config, temperature=self.temperature)
        return Path(folder)

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Save to a temporary folder and push it in one verified commit; returns the commit URL.

        Raises:
            hubtune.hub.PushError: the Hub refused or could not be reached (transient errors are retried).
        """
        import tempfile

        from hubtune.hub import PushTarget, push

        target = PushTarget(repo_id, revision=revision, private=private, commit_message=commit_message, token=token)
        with tempfile.TemporaryDirectory(prefix="hubtune-push-") as tmp:
            self.save_pretrained(tmp)
            return push(tmp, target)

    @property
    def num_classes(self) -> int:
        """The number of classes the model predicts."""
        return len(self.label_names)

    def _image(self, item: ImageInput, name: str) -> Image.Image:
        """An RGB image, as training decodes it (EXIF orientation, transparency on white), from any accepted input."""
        from hubtune.data import ImageTooLarge, decode, read_image_file, to_rgb

        if isinstance(item, Image.Image):
            return to_rgb(item)
        if type(item).__module__.startswith(("numpy", "torch")):
            return to_rgb(_array_image(item, name))
        if isinstance(item, (str, Path)):
            try:
                with Path(item).expanduser().open("rb") as f:
                    item = read_image_file(f)  # never read whole on the size the file claims
            except ImageTooLarge as err:
                raise ConfigError(f"{name}: {err}") from err
            except OSError as err:
                raise ConfigError(f"{name}: cannot read the image file ({err.strerror or err})") from err
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name}: images must be file paths, bytes, PIL images, numpy arrays or tensors, got "
                            f"{type(item).__name__}")
        img = decode(bytes(item))
        if img is None:
            raise ConfigError(f"{name}: not a readable image")
        return img

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 1, batch_size: int = 32,
                tta: bool = False) -> list[list[dict[str, Any]]]:
        """Classify images; per image, the `top_k` {"label", "score"} dicts by descending softmax probability (of the
        logits divided by the model's temperature, when it has one).

        Args:
            images: one image or a list of them, each a file path, raw encoded bytes, a PIL image, a numpy array
                (HxW or HxWxC, uint8 or floats in [0, 1]) or a tensor (HxW or CxHxW, uint8 or floats in [0, 1]).
            top_k: predictions per image, clipped to the number of classes.
            batch_size: images per forward pass.
            tta: also classify each image flipped left to right and average the two (see `logits`).

        Raises:
            ConfigError: top_k or batch_size is below 1, or an image cannot be read (named by path or index).
        """
        import torch

        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            names = [str(x) if isinstance(x, (str, Path)) else f"image {start + i}" for i, x in enumerate(batch)]
            out += self.classify(torch.stack([self.transform(self._image(item, n)) for item, n in zip(batch, names)]),
                                 top_k, tta)
        return out

    def logits(self, pixels: torch.Tensor, tta: bool = False, calibrated: bool = True) -> torch.Tensor:
        """Float32 logits of a normalized batch (N x C x H x W), divided by the temperature when there is one (and
        `calibrated`).

        With `tta`, the logits of the batch and of its mirror image (flipped left to right) are averaged before the
        softmax, as timm's train.py --tta reduces its test-time copies (the mean of the model outputs).
        """
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, self.dtype)
            out = self.model(x).float()
            if tta:
                out = (out + self.model(x.flip(-1)).float()) / 2
            return out if self.temperature is None or not calibrated else out / self.temperature

    def classify(self, pixels: torch.Tensor, top_k: int = 1, tta: bool = False) -> list[list[dict[str, Any]]]:
        """Top-k predictions for a batch already transformed by `self.transform` (N x C x H x W floats)."""
        probs = self.logits(pixels, tta).softmax(dim=-1)
        scores, indices = probs.topk(min(top_k, self.num_classes), dim=-1)
        return [[{"label": self.label_names[i], "score": s} for s, i in zip(row_s, row_i)]
                for row_s, row_i in zip(scores.tolist(), indices.tolist())]

    def __repr__(self) -> str:
        from hubtune.model import as_timm

        where = f"{self.source}@{self.revision[:12]}" if self.revision else self.source
        arch = as_timm(self.model).pretrained_cfg.get("architecture", type(self.model).__name__)
        calibrated = f", temperature={self.temperature:.4g}" if self.temperature is not None else ""
        return f"ImageClassifier({where!r}, {arch}, {self.num_classes} classes, device={self.device}{calibrated})"


def check_temperature(value: Any, where: str) -> float | None:
    """`value` as a softmax temperature: None, or a finite number > 0.

    Raises:
        ModelSourceError: anything else (a hand-edited config.json), named with `where`.
    """
    import math

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ModelSourceError(f"{where}: {CONFIG_NAME} has temperature {value!r}, expected a positive number (the "
                               f"softmax temperature `hubtune train --calibrate` fits); fix it or remove the key")
    return float(value)


def read_temperature(folder: Path, where: str) -> float | None:
    """The `temperature` a calibrated export keeps in its config.json (None without one).

    Raises:
        ModelSourceError: it is there but not a positive number.
    """
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{where}: cannot read {CONFIG_NAME} ({err})") from err
    return check_temperature(config.get("temperature") if isinstance(config, dict) else None, where)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype must be a floating point torch dtype such as 'float32', 'bfloat16' or 'float16', "
                          f"not {dtype!r}")
    return resolved


def _array_image(item: Any, name: str) -> Image.Image:
    """A PIL image from a numpy array (HxW, HxWxC) or a tensor (HxW, CxHxW): uint8, or floats in [0, 1]."""
    import numpy as np

    arr = item.detach().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
    if arr.ndim == 3 and type(item).__module__.startswith("torch"):
        arr = arr.transpose(1, 2, 0)  # tensors are channels-first, as torchvision makes them
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        layout = "HxW or CxHxW" if type(item).__module__.startswith("torch") else "HxW or HxWxC"
        raise ConfigError(f"{name}: an image array must be {layout} with 1, 3 or 4 channels, got shape "
                          f"{tuple(item.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"{name}: image arrays must be uint8 or floats in [0, 1], got {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)
