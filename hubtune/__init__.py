"""hubtune: fine-tune timm image classifiers on streamed Hugging Face datasets."""

from hubtune import hub_calls
from hubtune.version import __version__

hub_calls.install_timeouts(strict=False)  # every Hub call of a process that imports hubtune has a timeout

from hubtune.classifier import ImageClassifier

__all__ = ["ImageClassifier", "__version__"]
