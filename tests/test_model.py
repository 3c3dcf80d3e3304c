"""Model: creation errors and their suggestions, timm group names for --freeze, head protection, parameter tables."""

import copy
import time

import pytest
import torch

from hubtune import model as model_lib
from hubtune.errors import ConfigError, ModelSourceError


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


@pytest.mark.parametrize("spec, close", [
    ("resnet5O", "resnet50"),
    ("test_resnett", "test_resnet"),
    ("ResNet50", "resnet50"),
    ("resnet5O.a1_in1k", "resnet50.a1_in1k"),  # arch.tag given: pretrained names are suggested
])
def test_mistyped_model_suggests_the_closest_timm_names(spec, close):
    with pytest.raises(ModelSourceError) as err:
        model_lib.create(spec, num_classes=2, pretrained=False)
    shape, _, names = str(err.value).partition("; did you mean ")
    assert shape == f"--model {spec!r} is not a timm architecture, Hub id (org/name) or local-dir:PATH"
    names = names.removesuffix("?").replace(" or ", ", ").split(", ")
    assert names[0] == close and len(names) <= 3 and "\n" not in str(err.value)  # best first, at most 3, one line


def test_mistyped_pretrained_tag_suggests_the_closest_tag():
    with pytest.raises(ModelSourceError, match=r"resnet50 has no pretrained tag 'a1_in1kk' \(tags: a1_in1k, .*\); "
                                               r"did you mean resnet50\.a1_in1k"):
        model_lib.create("resnet50.a1_in1kk", num_classes=2, pretrained=False)


def test_model_name_with_nothing_close_says_how_to_list_models():
    with pytest.raises(ModelSourceError) as err:
        model_lib.create("not_a_real_net", num_classes=2, pretrained=False)
    assert str(err.value) == ("--model 'not_a_real_net' is not a timm architecture, Hub id (org/name) or local-dir:PATH; "
                              "list the architectures with timm.list_models('resnet*') (any glob)")


@pytest.mark.parametrize("argv, line", [
    (["summary", "resnet5O"], ("--model 'resnet5O' is not a timm architecture, Hub id (org/name) or local-dir:PATH; "
                               "did you mean resnet50?")),
    (["summary", "test_resnet", "--freeze", "stemm"], ("--freeze 'stemm' matches no parameters; groups: head, "
                                                       "stages.0, stages.1, stages.2, stages.3, stem; or a module-name "
                                                       "glob such as conv1*; did you mean stem?")),
])
def test_summary_prints_the_suggestion_as_one_hubtune_error_line(argv, line, capsys):
    from hubtune.cli import build_parser
    from hubtune.errors import run_guarded

    args = build_parser(argv).parse_args(argv)
    assert run_guarded(lambda: args.func(args)) == 2
    assert capsys.readouterr().err == f"hubtune: error: {line}\n"


@pytest.mark.parametrize("token, close", [
    ("stemm", "did you mean stem?"),
    ("stages.9", "did you mean stages.0, stages.1 or stages.2?"),
    ("layr1.*", "did you mean layer1.*?"),  # a glob: the same glob on the closest module names
    ("layr1.0.conv*", "did you mean layer1.0.conv1* or layer1.0.conv2*?"),
    ("fc.weigth", "did you mean fc.weight?"),  # parameter names too
])
def test_freeze_token_matching_nothing_suggests_close_groups_and_modules(net, token, close):
    with pytest.raises(ConfigError) as err:
        model_lib.resolve_freeze(net, token)
    assert str(err.value) == (f"--freeze {token!r} matches no parameters; groups: head, stages.0, stages.1, stages.2, "
                              f"stages.3, stem; or a module-name glob such as conv1*; {close}")


@pytest.mark.parametrize("token", ["zzz", "*.wieght"])  # nothing close; a leading wildcard has nothing to correct
def test_freeze_token_with_nothing_close_lists_the_groups_only(net, token):
    with pytest.raises(ConfigError) as err:
        model_lib.resolve_freeze(net, token)
    assert str(err.value).endswith("; or a module-name glob such as conv1*")


def test_suggestions_are_fast(net):
    start = time.perf_counter()
    for _ in range(3):
        with pytest.raises(ModelSourceError, match="did you mean"):
            model_lib.create("resnet5O.a1_in1k", num_classes=2, pretrained=False)
        with pytest.raises(ConfigError, match="did you mean"):
            model_lib.resolve_freeze(net, "layr1.*")
    assert time.perf_counter() - start < 5  # ~0.4 s on a busy CPU: ~1,800 pretrained names, ~100 module names


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
