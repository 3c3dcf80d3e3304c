"""TrainConfig: precedence, validation that reports everything at once, YAML round trip, --help."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from hubtune.config import TrainConfig, parse


def test_defaults_yaml_then_flags_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "test_resnet", "lr": 0.01, "epochs": 7, "freeze-bn": True}))
    cfg = parse(["--config", str(path), "--lr", "0.002"])
    assert cfg.model == "test_resnet"  # from YAML
    assert cfg.epochs == 7  # from YAML, dashed key accepted
    assert cfg.freeze_bn is True
    assert cfg.lr == 0.002  # flag beats YAML
    assert cfg.batch_size == TrainConfig().batch_size  # default


def test_unknown_yaml_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: test_resnet\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'.*accepted keys: model"):
        parse(["--config", str(path)])


def test_all_problems_reported_together_with_flag_value_and_accepted(tmp_path):
    with pytest.raises(ValueError) as err:
        parse(["--mixed-precision", "fp8", "--epochs", "0", "--val-fraction", "1.5", "--batch-size", "many"])
    msg = str(err.value)
    assert "--mixed-precision: got 'fp8', expected one of no, bf16, fp16" in msg
    assert "--epochs: got 0, expected an integer >= 1" in msg
    assert "--val-fraction: got 1.5" in msg
    assert "--batch-size: got 'many', expected a value of type int" in msg


def test_push_every_save_without_a_repo_to_push_to_is_refused():
    # it used to start a background pusher for repo None: a failed push and a warning at every new best
    with pytest.raises(ValueError, match="--push-every-save: got True, expected --push-to-hub REPO too"):
        parse(["--push-every-save"])
    assert parse(["--push-every-save", "--push-to-hub", "alice/x"]).push_repo == "alice/x"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = parse(["--model", "test_resnet", "--image-size", "48", "--freeze", "stem,stages.0-1", "--clip-grad", "1"])
    cfg.save(tmp_path / "train_config.yaml")
    again = parse(["--config", str(tmp_path / "train_config.yaml")])
    assert again == cfg


def test_every_field_is_documented_in_help():
    out = subprocess.run([sys.executable, "-m", "hubtune.train", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"(default: {f.default})" in text, f.name
    for flag in ("--pretrained", "--no-pretrained", "--config"):
        assert flag in text


def test_the_config_is_frozen_and_each_setting_declares_its_own_policies():
    """What must match on --resume, what the card leaves out, what `hubtune reproduce` resets and what keys the
    feature cache is declared by each field (no list elsewhere to forget a new field in), consistently."""
    import dataclasses

    from hubtune.config import MUST_MATCH, policy_fields

    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    resume, hidden, reset, cache = (policy_fields(p) for p in ("resume", "card", "reproduce", "cache_key"))
    assert set(resume.values()) == {MUST_MATCH} and {"model", "seed", "mixup", "balanced_sampling"} <= set(resume)
    assert not set(resume) & set(hidden)  # what changes the training is always in the card
    assert set(reset) <= set(hidden) and reset["push_to_hub"] is None and reset["resume"] is None
    assert {"model", "dataset", "mixed_precision"} <= set(cache)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(resume) | set(hidden) | set(reset) | set(cache) <= fields
