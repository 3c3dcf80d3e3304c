"""hubtune: fine-tune timm image classifiers on streamed Hugging Face datasets."""

__version__ = "0.1.0"

from hubtune.classifier import ImageClassifier  # noqa: E402  (light: torch/timm load on first use)

__all__ = ["ImageClassifier", "__version__"]
