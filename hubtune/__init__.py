"""hubtune: fine-tune timm image classifiers on streamed Hugging Face datasets."""

__version__ = "0.1.0"
