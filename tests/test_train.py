"""End-to-end training on generated data: learning, freezing, export, bad images, multi-process runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from hubtune import checkpoint, data, stream
from hubtune import model as model_lib
from hubtune.config import TrainConfig
from hubtune.job import dataset_source
from hubtune.train import train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(dataset, out, **kw) -> TrainConfig:
    base = dict(model="test_resnet", pretrained=False, dataset=str(dataset), image_size=32, epochs=3, batch_size=16,
                lr=3e-3, output_dir=str(out), num_workers=0, max_bad_fraction=0.05, progress=False, shuffle_buffer=64)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def frozen_run(tmp_path_factory, two_class_parquet, backbone):
    out = tmp_path_factory.mktemp("frozen_run")
    cfg = tiny_config(two_class_parquet, out, model=f"local-dir:{backbone}", pretrained=True,
                      freeze="stem,stages.0", freeze_bn=True)
    return train(cfg), cfg


def test_tiny_model_learns_the_two_class_task(frozen_run):
    result, _ = frozen_run
    assert result.best.metrics.accuracy >= 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_channels_last_defaults_to_cuda_only_and_the_resolved_choice_is_recorded(frozen_run):
    import yaml

    from hubtune.config import parse

    result, cfg = frozen_run
    assert cfg.channels_last is None  # not given
    assert yaml.safe_load((result.output_dir / "train_config.yaml").read_text())["channels_last"] is False  # CPU
    assert model_lib.default_channels_last(torch.device("cuda")) is True
    assert model_lib.default_channels_last(torch.device("cpu")) is False
    assert parse(["--model", "m", "--dataset", "d", "--no-channels-last"]).channels_last is False
    assert parse(["--model", "m", "--dataset", "d", "--channels-last"]).channels_last is True
    assert parse(["--model", "m", "--dataset", "d"]).channels_last is None


def test_frozen_parameters_and_bn_statistics_are_bit_identical(frozen_run, backbone):
    result, _ = frozen_run
    before = load_file(str(backbone / "model.safetensors"))
    after = load_file(str(result.output_dir / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(before[key], after[key]), key
    changed = [k for k in before if k.startswith("layer3.") and k.endswith("weight")]
    assert all(not torch.equal(before[k], after[k]) for k in changed)


def test_export_is_plain_timm_with_label_names_and_resolved_config(frozen_run):
    result, cfg = frozen_run
    out = result.output_dir
    assert {"config.json", "model.safetensors", "metrics.json", "train_config.yaml"} <= {p.name for p in out.iterdir()}
    net = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert net.pretrained_cfg["label_names"] == ["cat", "dog"]
    assert net.num_classes == 2
    assert tuple(net.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt*"))


def test_metrics_json_history_best_counts_and_skipped_images(frozen_run):
    result, _ = frozen_run
    m = json.loads((result.output_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(m["history"][0])
    assert m["best"]["epoch"] in (1, 2, 3) and m["best"]["val_accuracy"] == max(h["val_accuracy"] for h in m["history"])
    # 2 x 60 generated + 6 odd-mode images decode; the 3 broken files are skipped and counted exactly
    assert m["train_examples"] + m["val_examples"] == 126
    assert m["skipped_images"]["train"] + m["skipped_images"]["val"] == 3
    assert set(m["best"]["per_class"]) == {"cat", "dog"}


def test_too_many_bad_images_stop_the_run(two_class_parquet, tmp_path):
    cfg = tiny_config(two_class_parquet, tmp_path, max_bad_fraction=0.0, epochs=1)
    with pytest.raises(RuntimeError, match=r"could not be decoded, over --max-bad-fraction 0.0"):
        train(cfg)


def test_non_finite_loss_stops_with_step_and_advice(two_class_folder, tmp_path):
    cfg = tiny_config(two_class_folder, tmp_path, lr=1e30, epochs=1, optimizer="sgd")
    with pytest.raises(FloatingPointError, match=r"at step \d+ .*--mixed-precision bf16 or a lower --lr"):
        train(cfg)


def test_optimizer_only_sees_trainable_parameters(two_class_folder, tmp_path, backbone):
    train(tiny_config(two_class_folder, tmp_path, epochs=1, model=f"local-dir:{backbone}", pretrained=True,
                      freeze="stem,stages.0-2"))
    optimizer = json.loads((checkpoint.listing(tmp_path)[-1] / checkpoint.STATE_FILE).read_text())["optimizer"]
    net = model_lib.create(f"local-dir:{backbone}", num_classes=2)
    model_lib.freeze(net, model_lib.resolve_freeze(net, "stem,stages.0-2"), freeze_bn=False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert 0 < len(trainable) < len(list(net.parameters()))
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trainable)
    assert len(optimizer["state"]) == len(trainable)  # an AdamW moment pair for each, and for nothing else


def _launch(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_run_matches_single_process_eval_of_its_export(two_class_folder, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32",
             "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--num-workers", "0", "--max-bad-fraction", "0.05",
             "--output-dir", str(out), "--no-progress"]
    # accelerate 1.15 runs `--cpu --num_processes 2` as one process unless mpirun is set up; --multi_gpu starts
    # two processes through torchrun, and hubtune joins them in a gloo group when there is no GPU
    proc = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "hubtune/train.py", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[RANK 0] saved checkpoint" in proc.stderr  # with several processes, lines say whose they are
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_processes"] == 2
    # the same examples are held out as in a one-process run, and each is evaluated exactly once
    cfg = tiny_config(two_class_folder, out)
    _, val_src, info = data.open_splits(dataset_source(cfg))
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    _, eval_tf = model_lib.transforms(model_lib.data_config(net, 32))
    source = data.process_source(val_src, info, rank=0, world_size=1, shuffle_seed=None)
    val = stream.ExampleStream(source, eval_tf, keep_val=True, val_fraction=0.1, seed=None, shuffle_buffer=64)

    from accelerate import Accelerator

    from hubtune.metrics import evaluate

    accelerator = Accelerator(cpu=True)
    prepare = model_lib.Normalize(model_lib.data_config(net, 32), accelerator.device)
    single = evaluate(lambda b: net(prepare(b.pixel_values)), stream.make_loader(val, 8, 0, False), accelerator,
                      info.class_names)
    assert single.examples == m["val_examples"]
    # the export is the best epoch's weights
    assert single.accuracy == pytest.approx(m["best"]["val_accuracy"], abs=1e-9)
    assert single.confusion_matrix == m["best"]["confusion_matrix"]


def test_gradient_accumulation_counts_optimizer_steps(two_class_folder, tmp_path):
    result = train(tiny_config(two_class_folder, tmp_path, epochs=1, batch_size=8, grad_accum=2))
    batches = -(-result.history[0].train_examples // 8)
    assert result.metrics.global_step == -(-batches // 2)  # the last partial group still steps


ACTIVATION_DTYPES = """
import json, sys, torch
from hubtune.cli import main
seen = {}
def record(module, args, output):
    if isinstance(module, torch.nn.Conv2d) and module.training:
        seen[str(output.dtype)] = seen.get(str(output.dtype), 0) + 1
torch.nn.modules.module.register_module_forward_hook(record)
code = main(["train", *sys.argv[1:]])
print(json.dumps(seen))
sys.exit(code)
"""


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu_computes_in_bf16_and_exports_fp32(two_class_folder, tmp_path):
    # a process of its own: Accelerate keeps one precision per process
    flags = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32",
             "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--max-bad-fraction", "0.05",
             "--output-dir", str(tmp_path), "--no-progress", "--mixed-precision", "bf16"]
    proc = _launch([sys.executable, "-c", ACTIVATION_DTYPES, *flags])
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(seen) == {"torch.bfloat16"} and seen["torch.bfloat16"] > 0  # every training convolution ran in bf16
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(t.dtype in (torch.float32, torch.int64) for t in weights.values())


@pytest.mark.slow
def test_compiled_channels_last_run_writes_plain_checkpoints_that_resume_uncompiled(two_class_folder, tmp_path):
    # aot_eager goes through dynamo capture and Accelerate's compile wrapper as inductor does, minus code generation
    # (minutes on 2 cores); a process of its own, since Accelerate sets compilation up once per process
    flags = ["--model", "test_resnet", "--no-pretrained", "--dataset", str(two_class_folder), "--image-size", "32",
             "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--max-bad-fraction", "0.05",
             "--output-dir", str(tmp_path), "--no-progress", "--compile", "--compile-backend", "aot_eager",
             "--channels-last", "--shuffle-buffer", "64", "--lr", "3e-3"]
    proc = _launch([sys.executable, "-m", "hubtune.cli", "train", *flags])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = timm.create_model("test_resnet", num_classes=2).state_dict()
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == plain.keys()  # no "_orig_mod." from the compiled wrapper
    latest = checkpoint.find_resume(tmp_path, "latest")
    assert load_file(str(latest / checkpoint.MODEL_FILE)).keys() == plain.keys()
    resumed = train(tiny_config(two_class_folder, tmp_path, epochs=2, resume="latest"))
    assert [row.epoch for row in resumed.history] == [1, 2]


@pytest.mark.slow
def test_jpeg_draft_validation_uses_the_eval_resize_as_the_floor(two_class_folder, tmp_path):
    plain = train(tiny_config(two_class_folder, tmp_path / "plain", epochs=1))
    drafted = train(tiny_config(two_class_folder, tmp_path / "draft", epochs=1, jpeg_draft=True))
    # the test images are smaller than twice the eval size, so no JPEG may be scaled down: identical evaluations
    assert drafted.history[0].val.confusion_matrix == plain.history[0].val.confusion_matrix
    assert drafted.history[0].val.loss == plain.history[0].val.loss


@pytest.mark.slow
def test_a_new_run_never_overwrites_an_earlier_one_without_being_told(two_class_folder, tmp_path):
    from hubtune.errors import ConfigError, OutputDirError

    out = tmp_path / "run"
    train(tiny_config(two_class_folder, out, epochs=1))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a run that fails its checks, and a run that would start over: both refused before writing anything
    with pytest.raises(ConfigError, match="--freeze 'nosuchgroup' matches no parameters"):
        train(tiny_config(two_class_folder, out, epochs=1, freeze="nosuchgroup", overwrite_output_dir=True))
    with pytest.raises(OutputDirError, match=r"holds an earlier run \(checkpoints, train_config.yaml, metrics.json, "
                                             r".*pass --resume latest to continue it, --overwrite-output-dir"):
        train(tiny_config(two_class_folder, out, epochs=1, lr=1e-3))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    train(tiny_config(two_class_folder, out, epochs=1, lr=1e-3, overwrite_output_dir=True))
    assert "lr: 0.001" in (out / "train_config.yaml").read_text() and (out / "notes.txt").read_text() == "mine"
    assert len(checkpoint.listing(out)) == 1  # the earlier run's checkpoints were removed, not mixed in
    with pytest.raises(OutputDirError, match="is a file"):
        train(tiny_config(two_class_folder, out / "notes.txt"))


def test_impossible_sizes_are_refused_before_anything_is_allocated(two_class_folder, tmp_path):
    from hubtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--image-size: got 100000, expected an integer from 1 to 4,096"):
        train(tiny_config(two_class_folder, tmp_path / "a", image_size=100_000))
    with pytest.raises(ConfigError, match=r"--image-size 4096 with --batch-size 4096 and --num-workers 0 needs about "
                                          r"[\d.]+ GiB for the input batches alone; cpu has [\d.]+ GiB free"):
        train(tiny_config(two_class_folder, tmp_path / "b", image_size=4096, batch_size=4096))
    with pytest.raises(ConfigError, match=r"--image-size 64: vit_tiny_patch16_224 takes only 224 px inputs"):
        train(tiny_config(two_class_folder, tmp_path / "c", model="vit_tiny_patch16_224", image_size=64))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_empty_validation_split_is_refused_before_training(two_class_folder, tmp_path):
    from hubtune.errors import DataError

    with pytest.raises(DataError, match=r"has no validation images: --val-fraction 1e-06 held out none of its images"):
        train(tiny_config(two_class_folder, tmp_path / "out", val_fraction=1e-6))
    assert not (tmp_path / "out").exists()


def test_classes_with_few_validation_images_are_named_in_the_log_metrics_and_card(two_class_folder, tmp_path, caplog):
    result = train(tiny_config(two_class_folder, tmp_path, epochs=1))
    validation = result.metrics.run_info.validation
    assert validation["small_classes"] == ["cat", "dog"] and sum(validation["per_class"].values()) == 11
    assert any("few validation images for 2 class(es) ('cat': 6, 'dog': 5" in r.getMessage() for r in caplog.records)
    card = (tmp_path / "README.md").read_text()
    assert "**Few validation images:** `cat`, `dog` had fewer than 10" in card and "stratified content" not in card


def test_pickled_base_models_and_one_class_datasets_are_refused_with_the_fix(two_class_folder, backbone, tmp_path):
    import shutil

    from hubtune.errors import DataError, ModelSourceError

    pickled = tmp_path / "pickled"
    shutil.copytree(backbone, pickled)
    weights = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"only pickled weights \(pytorch_model.bin\).*hubtune trains only from "
                                               r"safetensors weights"):
        train(tiny_config(two_class_folder, tmp_path / "a", model=f"local-dir:{pickled}", pretrained=True))
    one_class = tmp_path / "one_class"
    shutil.copytree(two_class_folder / "cat", one_class / "cat")
    with pytest.raises(DataError, match=r"no ClassLabel column found, so the dataset has no class labels .*an "
                                        r"imagefolder needs one subfolder per class, at least two"):
        train(tiny_config(one_class, tmp_path / "b"))


@pytest.mark.slow
def test_gradual_unfreezing_under_two_processes_trains_each_part_from_its_epoch(two_class_folder, backbone, tmp_path):
    """Two gloo processes: a part that starts to train in epoch 2 must join DDP's gradient synchronisation (the run
    checks that every process holds the same weights after each epoch) and must not move before its epoch."""
    out = tmp_path / "ddp"
    flags = ["--model", f"local-dir:{backbone}", "--dataset", str(two_class_folder), "--image-size", "32",
             "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--num-workers", "0", "--max-bad-fraction", "0.05",
             "--output-dir", str(out), "--no-progress", "--freeze", "stem,stages", "--freeze-bn",
             "--unfreeze-at", "stages.3=2", "--model-ema", "--model-ema-decay", "0.9", "--report-to", "tensorboard"]
    proc = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "hubtune/train.py", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages.3 start(s) to train" in proc.stderr
    # EMA evaluated over both processes' examples, and one set of TensorBoard files (the main process's)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert all(0.0 <= row["ema"]["val_accuracy"] <= 1.0 for row in history) and len(history) == 2
    assert len(list((out / "runs" / "hubtune").glob("events.out.tfevents.*"))) == 1
    start = load_file(str(backbone / "model.safetensors"))
    first, second = (load_file(str(p / "model.safetensors")) for p in checkpoint.listing(out))
    layer4 = [k for k in start if k.startswith("layer4.") and k.endswith(".weight")]
    layer3 = [k for k in start if k.startswith("layer3.") and k.endswith(".weight")]
    assert layer4 and all(torch.equal(first[k], start[k]) for k in layer4)  # frozen in epoch 1
    assert all(not torch.equal(second[k], start[k]) for k in layer4 if "bn" not in k)  # trained in epoch 2
    assert all(torch.equal(second[k], start[k]) for k in layer3)  # never unfrozen
    bn_means = [k for k in start if k.startswith("layer4.") and k.endswith("running_mean")]
    assert all(torch.equal(first[k], start[k]) for k in bn_means)  # --freeze-bn: fixed while frozen
    assert any(not torch.equal(second[k], start[k]) for k in bn_means)  # and updating once the part trains


@pytest.mark.slow
def test_trackers_that_are_missing_or_cannot_start_cost_a_warning_not_the_run(two_class_folder, tmp_path, caplog):
    import importlib.util

    missing = next(n for n in ("wandb", "aim", "comet_ml", "mlflow", "trackio") if not importlib.util.find_spec(n))
    result = train(tiny_config(two_class_folder, tmp_path, epochs=1, report_to=f"tensorboard,{missing}"))
    assert result.metrics.history and list((tmp_path / "runs" / "hubtune").glob("events.out.tfevents.*"))
    assert f"--report-to {missing}: the {missing} package is not installed (pip install {missing}); training goes " \
           "on without it" in caplog.text
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "runs").write_text("not a folder")  # TensorBoard cannot create its log directory
    again = train(tiny_config(two_class_folder, tmp_path, epochs=2, report_to="tensorboard", resume="latest"))
    assert [row.epoch for row in again.history] == [1, 2]
    assert "--report-to tensorboard: could not start (" in caplog.text and "training goes on without it" in caplog.text


@pytest.mark.slow
def test_summary_prints_the_unfreezing_schedule_per_epoch():
    proc = _launch([sys.executable, "-m", "hubtune.cli", "summary", "test_resnet", "--num-classes", "2", "--freeze",
                    "stem,stages", "--unfreeze-at", "stages.3=2,all=3"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("schedule (--unfreeze-at):\n")[1].splitlines()
    assert lines[0] == "  epoch 1: 194 of 372,882 parameters train"
    assert lines[1] == "  epoch 2: 268,034 of 372,882 parameters train; starts to train: stages.3"
    assert lines[2] == "  epoch 3: 372,882 of 372,882 parameters train; starts to train: all"
