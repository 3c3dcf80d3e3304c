"""examples/ are product surface: the flagship YAML loads and validates, and runs on the tiny fixtures."""

from pathlib import Path

import yaml

from hubtune.config import parse
from hubtune.train import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_flagship_yaml_loads_and_validates():
    cfg = parse(["--config", str(EXAMPLES / "cats_vs_dogs.yaml")])
    assert cfg.dataset == "microsoft/cats_vs_dogs" and cfg.label_column == "labels"
    assert cfg.model == "timm/resnet50.a1_in1k" and cfg.mixed_precision == "bf16"


def test_flagship_yaml_runs_on_tiny_fixture_with_overrides(two_class_parquet, tmp_path):
    """Same file, only the model, data and size swapped for the offline fixtures."""
    keys = yaml.safe_load((EXAMPLES / "cats_vs_dogs.yaml").read_text())
    assert {"freeze", "freeze_bn", "clip_grad", "warmup_steps"} <= set(keys)
    cfg = parse(["--config", str(EXAMPLES / "cats_vs_dogs.yaml"), "--model", "test_resnet", "--no-pretrained",
                 "--dataset", str(two_class_parquet), "--image-size", "32", "--batch-size", "16",
                 "--max-steps", "2", "--num-workers", "0", "--mixed-precision", "no",
                 "--max-bad-fraction", "0.05", "--warmup-steps", "1", "--output-dir", str(tmp_path)])
    result = train(cfg)
    assert result.metrics.global_step == 2
    assert (tmp_path / "model.safetensors").is_file()
