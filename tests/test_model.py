"""Model: creation errors, timm group names for --freeze, head protection, parameter tables."""

import copy

import pytest
import torch

from hubtune import model as model_lib


@pytest.fixture
def net():
    return model_lib.create("test_resnet", num_classes=3, pretrained=False)


def test_groups_follow_timm_group_matcher(net):
    groups = set(model_lib.param_groups(net).values())
    assert groups == {"stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"}


def test_stage_ranges_globs_and_aliases(net):
    names = model_lib.resolve_freeze(net, "stem,stages.0-1")
    assert "conv1.0.weight" in names and "layer2.0.conv1.weight" in names
    assert not any(n.startswith(("layer3", "layer4", "fc")) for n in names)
    assert model_lib.resolve_freeze(net, "blocks.3") == model_lib.resolve_freeze(net, "layer4.*")


def test_pattern_that_would_freeze_the_head_is_refused_unless_named(net):
    with pytest.raises(ValueError, match="would freeze the classifier head"):
        model_lib.resolve_freeze(net, "*")
    assert "fc.weight" in model_lib.resolve_freeze(net, "stages,head")


def test_unknown_freeze_token_lists_groups(net):
    with pytest.raises(ValueError, match=r"--freeze 'stages.9' matches no parameters; groups: head, stages.0"):
        model_lib.resolve_freeze(net, "stages.9")


def test_freeze_bn_fixes_batchnorm_in_frozen_parts_only(net):
    total_before = sum(p.numel() for p in net.parameters())
    names = model_lib.resolve_freeze(net, "stem,stages.0")
    model_lib.freeze(net, names, freeze_bn=True)
    net.train()
    assert not net.layer1[0].bn1.training and model_lib.has_fixed_statistics(net.layer1[0].bn1)
    assert net.layer2[0].bn1.training and not model_lib.has_fixed_statistics(net.layer2[0].bn1)
    before = net.layer1[0].bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(net.layer1[0].bn1.running_mean, before)  # statistics fixed, in train mode too
    assert not model_lib.has_fixed_statistics(copy.deepcopy(net).layer2[0].bn1)
    assert not copy.deepcopy(net).train().layer1[0].bn1.training  # a copy (export) keeps it
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    rows = {r[0]: r for r in model_lib.parameter_table(net)}
    assert rows["layer1"][2] == 0 and rows["layer1"][3] == rows["layer1"][1]
    assert rows["total"][1] == total_before
    assert rows["bn1"][3] == rows["bn1"][1] > 0


def test_unknown_model_is_one_line_error():
    with pytest.raises(ValueError, match=r"--model 'not_a_real_net' is not a timm architecture"):
        model_lib.create("not_a_real_net", num_classes=2, pretrained=False)


def test_model_spec_mapping():
    assert model_lib.timm_name("timm/resnet50.a1_in1k") == "hf-hub:timm/resnet50.a1_in1k"
    assert model_lib.timm_name("hf-hub:org/x@v1") == "hf-hub:org/x@v1"
    assert model_lib.timm_name("local-dir:/tmp/x") == "local-dir:/tmp/x"
    assert model_lib.timm_name("resnet18") == "resnet18"


def test_export_round_trip_through_plain_timm(net, tmp_path):
    import timm

    model_lib.freeze(net, model_lib.resolve_freeze(net, "stem"), freeze_bn=True)
    cfg = model_lib.data_config(net, 48)
    model_lib.export(net, tmp_path, ["a", "b", "c"], cfg)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    net.eval()
    x = torch.randn(2, 3, 48, 48)
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 48, 48)


def test_a_stage_range_past_the_last_stage_is_an_error_not_clamped(net):
    with pytest.raises(ValueError, match=r"--freeze 'stages.0-99' reaches past the model's stages \(stages.4, "
                                         r"stages.5, stages.6 ... do not exist\); valid range: stages.0-3"):
        model_lib.resolve_freeze(net, "stages.0-99")
    assert model_lib.resolve_freeze(net, "stages.0-3") == model_lib.resolve_freeze(net, "stages")
