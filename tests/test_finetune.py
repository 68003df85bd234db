"""dynify.train.finetune and ``dynify finetune`` on tiny image sets the tests write.

References are independent of the code under test: the uninterrupted run for resume, the
schedule formulas for the temperature, a hash of the checkpoint file for "left intact", a
plain loop over the validation images for the accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _imagedata import CLASSES, tar_folder, write_image_folder, write_splits
from torch import nn

import dynify
import dynify.errors
import dynify.train.loop
from dynify.cli import main
from dynify.cli.finetune import PYTHON_ONLY
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.train import (
    FinetuneSettings,
    StopTraining,
    TrainingDiverged,
    evaluate,
    finetune,
    load_data,
)
from dynify.train.run import MODEL_OPTIONS
from dynify.train.settings import FREE, GROW, SAME, kept_on_resume

RECIPE = {
    "defaults": {"temperature": {"start": 10, "end": 1, "length": 2, "shape": "linear"}},
    "rules": [
        {"select": {"stem": True}, "convert": False},
        {"select": {"classifier": True}, "convert": False},
        {
            "select": {"name": "layer4.*"},
            "temperature": {"start": 6, "end": 2, "length": 3, "shape": "exponential"},
        },
    ],
}
FAST = dict(batch_size=16, lr=0.05, img_size=32, workers=0, progress=False)


def tiny_model(*, convert: bool = True, seed: int = 0) -> nn.Module:
    """A 4-class timm ResNet narrow enough to train in seconds, converted by RECIPE."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "test_resnet", num_classes=len(CLASSES), channels=(8, 16, 24, 32), stem_width=8
    )
    if convert:
        model = dynify.apply(model, RECIPE, input_size=(3, 32, 32), seed=seed)
    return model


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_splits(tmp_path_factory.mktemp("imgs"), train=16, val=8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _top1_by_hand(model: nn.Module, images) -> float:
    """Top-1 (percent) of ``model`` on ``images`` ((PIL image, label) pairs), one image at a
    time through timm's evaluation transform at 32x32 on the whole image: none of dynify's
    loaders or counting."""
    cfg = model.pretrained_cfg
    transform = timm.data.create_transform(
        input_size=(3, 32, 32), crop_pct=1.0, mean=cfg["mean"], std=cfg["std"]
    )
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(transform(img)[None]).argmax() == label) for img, label in images)
    return 100 * correct / len(images)


# -- data -----------------------------------------------------------------------------------


def test_data_specs(tmp_path: Path, splits: Path) -> None:
    data = load_data(splits)
    assert (len(data.train), len(data.val), data.classes) == (64, 32, list(CLASSES))

    folder = write_image_folder(tmp_path / "one", 10)
    held = load_data(folder, holdout=0.25)
    assert (len(held.train), len(held.val)) == (30, 10)
    assert not set(held.train.indices) & set(held.val.indices)  # type: ignore[attr-defined]

    tars = tmp_path / "tars"
    tars.mkdir()
    tar_folder(splits / "train", tars / "train.tar")
    tar_folder(splits / "val", tars / "test.tar")
    from_tars = load_data(tars)
    assert (len(from_tars.train), len(from_tars.val)) == (64, 32)
    assert from_tars.classes == list(CLASSES) and from_tars.val_source.endswith("test.tar")
    image, label = from_tars.val[31]
    assert image.size == (32, 32) and label == 3

    one_tar = load_data(tars / "train.tar", holdout=0.5, train_images=12)
    assert (len(one_tar.train), len(one_tar.val)) == (12, 32)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("missing-folder", ["missing-folder", "no such file or folder", "torch/cifar10"]),
        ("torch/imagenet22k", ["torch/imagenet22k", "torch/cifar10"]),
    ],
)
def test_bad_data_is_one_line(tmp_path: Path, spec: str, words: list[str]) -> None:
    target = str(tmp_path / spec) if "/" not in spec else spec
    with pytest.raises(DynifyError) as err:
        load_data(target, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_mismatched_classes_and_models_are_refused(tmp_path: Path, splits: Path) -> None:
    from PIL import Image

    write_image_folder(tmp_path / "train", 2)
    write_image_folder(tmp_path / "val", 2)
    (tmp_path / "val" / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(DynifyError, match="different classes"):
        load_data(tmp_path)
    wrong = timm.create_model("test_resnet", num_classes=7)
    with pytest.raises(DynifyError, match="num_classes=4"):
        finetune(model=wrong, data=splits, epochs=1, **FAST)


# -- training -------------------------------------------------------------------------------


def test_loss_falls_and_temperature_follows_the_plan(tmp_path: Path, splits: Path) -> None:
    model = tiny_model()
    seen: list[tuple[int, dict, dict[str, float]]] = []

    def record(epoch: int, metrics: dict) -> None:
        temps = {n: m.temperature for n, m in model.named_modules() if isinstance(m, DynamicConv2d)}
        seen.append((epoch, metrics, temps))

    result = finetune(
        model=model, data=splits, epochs=4, output=tmp_path, callbacks=[record], **FAST
    )
    history = result.history
    assert [e for e, _, _ in seen] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    # 4 classes: chance is 25%. (16 steps on 64 images: the converted model lands between
    # 65% and 100% over seeds, the static one at 100%.)
    assert result.top1 >= 50.0, history
    for epoch, metrics, temps in seen:
        for name, value in temps.items():
            if name.startswith("layer4."):
                want = 6 * (2 / 6) ** min(epoch / 3, 1)
            else:
                want = 10 + (1 - 10) * min(epoch / 2, 1)
            assert value == pytest.approx(want, rel=1e-5), (epoch, name)
        assert metrics["temperature"] == pytest.approx(max(temps.values()), rel=1e-6)
    # Evaluation counts: the public evaluate() and a plain loop agree with the last epoch's.
    final = evaluate(model=model, data=splits, img_size=32, workers=0, batch_size=5)
    assert final["val_top1"] == history[-1]["val_top1"] and final["images"] == 32
    assert _top1_by_hand(model, load_data(splits).val) == history[-1]["val_top1"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["val_top1"] for h in saved["history"]] == [h["val_top1"] for h in history]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 4


def _compare_checkpoints(a: Path, b: Path) -> None:
    ca = torch.load(a, weights_only=True)
    cb = torch.load(b, weights_only=True)
    assert ca["epoch"] == cb["epoch"] and ca["updates"] == cb["updates"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, value in sa[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[i][key])), (i, key)
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    assert ca["lr_scheduler"] == cb["lr_scheduler"]
    assert ca["temperature"] == cb["temperature"]
    drop = ("seconds", "images_per_s")
    ha = [{k: v for k, v in h.items() if k not in drop} for h in ca["history"]]
    hb = [{k: v for k, v in h.items() if k not in drop} for h in cb["history"]]
    assert ha == hb


def test_resume_equals_an_uninterrupted_run(tmp_path: Path, splits: Path) -> None:
    settings = dict(FAST, epochs=3, aug_scale=(0.5, 1.0))
    whole = finetune(model=tiny_model(), data=splits, output=tmp_path / "whole", **settings)

    def interrupt(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise StopTraining("simulated interruption")

    part = finetune(
        model=tiny_model(), data=splits, output=tmp_path / "part", callbacks=[interrupt], **settings
    )
    assert part.stopped == "simulated interruption" and part.epochs == 1
    # A fresh process would rebuild the model from scratch; and loading workers must not matter.
    settings["workers"] = 1
    resumed = finetune(
        model=tiny_model(seed=1), data=splits, output=tmp_path / "part", resume=True, **settings
    )
    assert resumed.epochs == 3
    _compare_checkpoints(tmp_path / "whole/checkpoint.pth", tmp_path / "part/checkpoint.pth")
    assert whole.top1 == resumed.top1

    with pytest.raises(DynifyError, match=r"batch_size=16, this run asks batch_size=8;") as err:
        finetune(
            model=tiny_model(),
            data=splits,
            output=tmp_path / "part",
            resume=True,
            **dict(settings, batch_size=8),
        )
    assert "batch_size" in err.value.arguments
    with pytest.raises(DynifyError, match="another conversion plan"):
        finetune(
            model=tiny_model(convert=False),
            data=splits,
            output=tmp_path / "part",
            resume=True,
            **settings,
        )
    wider = timm.create_model(
        "test_resnet", num_classes=len(CLASSES), channels=(8, 16, 24, 40), stem_width=8
    )
    wider = dynify.apply(wider, RECIPE, input_size=(3, 32, 32))
    with pytest.raises(DynifyError, match="does not fit"):
        finetune(model=wider, data=splits, output=tmp_path / "part", resume=True, **settings)
    with pytest.raises(DynifyError, match="already holds a run"):
        finetune(model=tiny_model(), data=splits, output=tmp_path / "part", **settings)
    with pytest.raises(DynifyError, match="nothing to resume"):
        finetune(model=tiny_model(), data=splits, output=tmp_path / "new", resume=True, **settings)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, splits: Path) -> None:
    model = tiny_model()
    poison = {"on": False, "sha": None}
    model.fc.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)

    def after_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            poison["sha"] = _sha(tmp_path / "checkpoint.pth")
            poison["on"] = True

    with pytest.raises(TrainingDiverged) as err:
        finetune(
            model=model, data=splits, epochs=3, output=tmp_path, callbacks=[after_epoch], **FAST
        )
    message = str(err.value)
    assert "\n" not in message
    assert "NaN" in message and "epoch 2, step 1/" in message and "(epoch 1)" in message
    assert str(tmp_path / "checkpoint.pth") in message and "intact" in message
    assert _sha(tmp_path / "checkpoint.pth") == poison["sha"]
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_distillation_trains_the_student_only(splits: Path) -> None:
    teacher = tiny_model(convert=False)
    student = dynify.apply(teacher, RECIPE, input_size=(3, 32, 32))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = finetune(
        model=student, data=splits, epochs=1, teacher=teacher, distill_weight=0.7, **FAST
    )
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert result.history[0]["train_loss"] > 0
    assert not torch.equal(student.fc.weight.cpu(), teacher.fc.weight.cpu())


def test_mixed_precision_and_channels_last(splits: Path) -> None:
    """The GPU defaults (autocast, NHWC) exercised on the CPU with bfloat16."""
    student = tiny_model()
    result = finetune(
        model=student,
        data=splits,
        epochs=1,
        amp=True,
        channels_last=True,
        teacher=tiny_model(convert=False),
        train_images=32,
        val_images=16,
        **FAST,
    )
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert student.fc.weight.dtype == torch.float32
    stem = student.conv1[0].weight
    assert stem.is_contiguous(memory_format=torch.channels_last)


# -- command line ---------------------------------------------------------------------------


def test_cli_missing_data_is_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    code = main(["finetune", "test_resnet", "--data", str(missing), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(missing) in err and "no such file or folder" in err


def test_cli_unreachable_download_is_exit_2_one_line(tmp_path: Path) -> None:
    env = dict(os.environ)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"  # the discard port: nothing listens, fails at once
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "dynify", "finetune", "test_resnet"),
            *("--data", "torch/cifar10", "--data-cache", str(tmp_path), "--epochs", "1"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "torch/cifar10" in proc.stderr and "could not download" in proc.stderr


@pytest.mark.slow
def test_cli_trains_resumes_and_writes_an_artifact(tmp_path: Path, splits: Path) -> None:
    out = tmp_path / "run"
    common = ["finetune", "test_resnet", "--data", str(splits), "--img-size", "32"]
    common += ["--batch-size", "32", "--workers", "0", "--output", str(out), "--quiet"]
    assert main([*common, "--epochs", "1", "--teacher"]) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert main([*common, "--epochs", "2", "--teacher", "--resume"]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["settings"]["distill"]
    model = dynify.load(out / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    info = dynify.artifact.read_info(out / "model.safetensors")
    assert info["extra"]["finetune"]["epoch"] == 2
    # An artifact trains on as MODEL_OR_ARTIFACT (already converted, holding its weights).
    again = tmp_path / "again"
    args = ["finetune", str(out / "model.safetensors"), "--data", str(splits), "--epochs", "1"]
    args += ["--img-size", "32", "--batch-size", "32", "--workers", "0", "--quiet"]
    assert main([*args, "--output", str(again)]) == 0
    assert (again / "model.safetensors").is_file()


@pytest.mark.slow
def test_cifar10_slice(tmp_path: Path) -> None:
    root = os.environ.get("DYNIFY_CIFAR10")
    if not root:
        default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
        root = str(default) if default.is_dir() else ""
    if not root or not Path(root, "train.tar").is_file():
        pytest.skip("CIFAR-10 copy not found: set DYNIFY_CIFAR10 to a folder with train.tar")
    data = load_data(root, train_images=256, val_images=128)
    assert data.num_classes == 10 and data.val_source.endswith("test.tar")
    model = timm.create_model("test_resnet", num_classes=10, channels=(8, 16, 24, 32), stem_width=8)
    model = dynify.apply(model, "dycnn", input_size=(3, 32, 32))
    result = finetune(model=model, data=data, epochs=1, output=tmp_path, **FAST)
    assert result.epochs == 1
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    # The reported top-1 is what the returned model gets on the same 128 validation images,
    # counted by hand (within one image: batches of 16 and of 1 may round a near-tie apart).
    by_hand = _top1_by_hand(result.model, data.val)
    assert abs(result.top1 - by_hand) <= 100 / 128 + 1e-9, (result.top1, by_hand)


# -- --num-classes, and what --resume refuses -----------------------------------------------

QUICK_CLI = ["--img-size", "32", "--batch-size", "16", "--workers", "0", "--quiet"]
QUICK_CLI += ["--routing-images", "0"]


def _one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def artifact_1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact of a converted test_resnet with timm's default 1000 classes."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", channels=(8, 16, 24, 32), stem_width=8)
    model = dynify.apply(model, RECIPE, input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("art") / "r.safetensors"
    dynify.save(model, path, model_name="test_resnet", model_kwargs={
        "channels": (8, 16, 24, 32), "stem_width": 8})  # fmt: skip
    return path


def test_cli_artifact_with_other_classes_names_the_flag(capsys, tmp_path, splits, artifact_1000):
    argv = ["finetune", str(artifact_1000), "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    err = _one_line(capsys, [*argv, "--output", str(tmp_path / "run")])
    assert "classifies 1000 classes, the data has 4" in err and "--num-classes=4" in err
    assert not (tmp_path / "run").exists()
    err = _one_line(capsys, [*argv, "--num-classes", "3", "--output", str(tmp_path / "run")])
    assert "--num-classes=3: the data has 4 classes" in err


def test_cli_num_classes_replaces_an_artifacts_classifier(capsys, tmp_path, splits, artifact_1000):
    out = tmp_path / "run"
    argv = ["finetune", str(artifact_1000), "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    argv += ["--train-images", "16", "--val-images", "4"]
    assert main([*argv, "--num-classes", "4", "--output", str(out)]) == 0
    said = capsys.readouterr().err  # through the dynify logger
    assert "replaced the artifact's 1000-class classifier by a new 4-class one" in said
    model = dynify.load(out / "model.safetensors")
    assert model.num_classes == 4 and model.fc.out_features == 4
    before = dynify.load(artifact_1000)  # the rest of the network is the artifact's plan
    assert [lp.name for lp in dynify.plan_of(model).converted] == [
        lp.name for lp in dynify.plan_of(before).converted
    ]


def test_cli_num_classes_builds_a_timm_model_with_it(capsys, tmp_path, splits, monkeypatch):
    built: list[nn.Module] = []

    def capture(model: nn.Module, settings: FinetuneSettings, **kwargs: object) -> None:
        built.append(model)
        raise DynifyError("captured")

    monkeypatch.setattr(dynify.train.loop, "finetune", capture)
    argv = ["finetune", "test_resnet", "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    argv += ["--output", str(tmp_path / "run")]
    assert "captured" in _one_line(capsys, [*argv, "--num-classes", "4"])
    assert built[0].num_classes == 4 and built[0].fc.out_features == 4
    err = _one_line(capsys, [*argv, "--num-classes", "10"])
    assert "--num-classes=10: the data has 4 classes" in err and len(built) == 1


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory, splits: Path) -> tuple[Path, list]:
    """A finished 1-epoch CLI run (its folder and its command line) to resume."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = ["finetune", "test_resnet", "--data", str(splits), *QUICK_CLI, "--output", str(out)]
    assert main([*argv, "--epochs", "1", "--train-images", "16"]) == 0
    return out, argv


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--train-images", "8"], "--train-images=16, this run asks --train-images=8;"),
        (["--train-images", "16", "--val-images", "4"], "no --val-images, this run asks --val-im"),
        (["--train-images", "16", "--lr", "0.5"], "--lr=0.00625, this run asks --lr=0.5;"),
        # A switch keeps its Python name (its flag, --no-aug, says the opposite).
        (["--train-images", "16", "--no-aug"], "augment=True, this run asks augment=False;"),
        (["--train-images", "16", "--seed", "3"], "--seed=0, this run asks --seed=3;"),
        (["--train-images", "16", "--teacher"], "with no --teacher, this run asks for --teach"),
        (["--train-images", "16", "--recipe", "all"], "another conversion plan"),
    ],
)
def test_cli_resume_refuses_a_changed_run(capsys, one_epoch_run, change, message) -> None:
    out, argv = one_epoch_run
    before = _sha(out / "checkpoint.pth")
    err = _one_line(capsys, [*argv, "--epochs", "2", "--resume", *change])
    assert message in err
    assert "temperature" not in err
    assert _sha(out / "checkpoint.pth") == before


def test_cli_resume_accepts_more_epochs_and_other_workers(capsys, one_epoch_run) -> None:
    out, argv = one_epoch_run
    change = ["--train-images", "16", "--workers", "1", "--routing-images", "8"]
    assert main([*argv, "--epochs", "2", "--resume", *change]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["settings"]["train_images"] == 16
    err = _one_line(capsys, [*argv, "--epochs", "1", "--resume", "--train-images", "16"])
    assert "stops at epoch 2, this run asks --epochs=1; give --epochs=2 or more" in err


# -- FinetuneSettings -----------------------------------------------------------------------


def test_settings_defaults_and_derived_values() -> None:
    s = FinetuneSettings(data="imgs", epochs=3)
    expected = dict(batch_size=128, lr=None, opt="sgd", weight_decay=1e-4, momentum=0.9)
    expected |= dict(sched="cosine", warmup_epochs=0, min_lr=0.0, smoothing=0.1, augment=True)
    expected |= dict(distill_weight=0.5, distill_temperature=1.0, seed=0, holdout=0.1)
    expected |= dict(output=None, resume=False, amp=None, channels_last=None, workers=2)
    expected |= dict(progress=True, routing_images=256, train_images=None, temperature=None)
    assert {k: getattr(s, k) for k in expected} == expected
    # The default peak LR: 0.1 x B/256 for SGD-like optimisers, 1e-3 x B/256 for others.
    assert s.peak_lr == pytest.approx(0.05)
    assert FinetuneSettings(
        data="d", epochs=1, opt="adamw", batch_size=512
    ).peak_lr == pytest.approx(2e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 4  # type: ignore[misc]
    cpu = s.resolve(torch.device("cpu"))
    assert (cpu.lr, cpu.amp, cpu.channels_last) == (pytest.approx(0.05), False, False)
    assert s.resolve(torch.device("cuda", 0)).amp is True
    assert FinetuneSettings(data="d", epochs=1, aug_scale=[0.5, 1]).aug_scale == (0.5, 1.0)
    with pytest.raises(TypeError, match="epochs"):
        FinetuneSettings(data="imgs")  # type: ignore[call-arg]


def test_every_field_has_a_resume_rule_and_epochs_alone_grows() -> None:
    rules = {f.name: f.metadata["resume"] for f in dataclasses.fields(FinetuneSettings)}
    assert set(rules.values()) <= {SAME, GROW, FREE}
    assert [name for name, rule in rules.items() if rule == GROW] == ["epochs"]
    assert kept_on_resume() == tuple(name for name, rule in rules.items() if rule == SAME)
    for free in ("workers", "routing_images", "progress", "output", "resume", "device"):
        assert rules[free] == FREE, free
    with pytest.warns(DeprecationWarning, match="kept_on_resume"):
        old = dynify.train.loop.RESUME_KEYS
    assert set(old) == {*kept_on_resume(), "distill"}
    with pytest.warns(DeprecationWarning, match="resume.METRICS_NAME"):
        assert dynify.train.loop.METRICS_NAME == "metrics.json"


BAD_SETTINGS = [
    ("epochs", 0),
    ("epochs", 1.5),
    ("batch_size", 0),
    ("lr", -1.0),
    ("lr", float("nan")),
    ("weight_decay", -1e-4),
    ("warmup_epochs", -1),
    ("smoothing", 1.0),
    ("clip_grad", 0.0),
    ("img_size", 0),
    ("crop_pct", 1.5),
    ("distill_weight", 1.5),
    ("distill_temperature", 0.0),
    ("seed", -1),
    ("seed", True),
    ("train_images", 0),
    ("holdout", 1.0),
    ("workers", -1),
    ("routing_images", -1),
    ("sched", "cosin"),
    ("aug_scale", (0.9, 0.5)),
    ("aug_scale", (0.0, 1.0)),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
def test_settings_refuse_a_bad_value_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(DynifyError) as err:
        FinetuneSettings(**{"data": "imgs", "epochs": 1, name: value})
    message = str(err.value)
    assert message.startswith(name) or f" {name}=" in message, message
    assert err.value.arguments == (name,) and "\n" not in message and "--" not in message


def test_resume_without_output_names_both() -> None:
    with pytest.raises(DynifyError, match="resume needs the run folder: give output") as err:
        FinetuneSettings(data="imgs", epochs=1, resume=True)
    assert err.value.arguments == ("resume", "output")


def test_settings_object_and_keywords_are_one_call(tmp_path: Path, splits: Path) -> None:
    small = dict(FAST, epochs=1, train_images=16, val_images=8, routing_images=0)
    settings = FinetuneSettings(data=splits, **small)
    by_object = finetune(tiny_model(), settings, output=tmp_path / "a")
    by_keywords = finetune(model=tiny_model(), data=splits, output=tmp_path / "b", **small)
    assert by_object.settings == dataclasses.replace(by_keywords.settings, output=tmp_path / "a")
    assert by_object.history[0]["train_loss"] == by_keywords.history[0]["train_loss"]
    with pytest.raises(dynify.errors.DynifyTypeError, match="FinetuneSettings"):
        finetune(tiny_model(), {"data": splits, "epochs": 1})  # type: ignore[arg-type]


def test_cli_flags_are_the_settings_fields() -> None:
    """Every FinetuneSettings field has a flag of its name (argparse destination) unless it
    is listed as Python-only, and every flag is a field or a model option: a new field
    without a flag, or a flag the generic mapping would drop, fails here."""
    import argparse

    from dynify.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["finetune"]._actions if a.dest != "help"}
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    assert set(PYTHON_ONLY) <= names
    assert dests == (names - set(PYTHON_ONLY)) | set(MODEL_OPTIONS) | {"model"}
    assert not (names & set(MODEL_OPTIONS))
    # A flag's default is the field's (the same run from Python and from the shell).
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneSettings)}
    args = parser.parse_args(["finetune", "m", "--data", "d", "--epochs", "1"])
    for name in names - set(PYTHON_ONLY) - {"data", "epochs"}:
        assert getattr(args, name) == defaults[name], name


def test_progress_goes_through_the_logger(splits: Path, capsys: pytest.CaptureFixture) -> None:
    small = dict(FAST, epochs=1, train_images=16, val_images=8, routing_images=0)
    small["progress"] = True
    finetune(model=tiny_model(), data=splits, **small)
    err = capsys.readouterr().err
    assert "epoch 1/1: train loss" in err and "data " in err
    dynify_logger = logging.getLogger("dynify")
    level = dynify_logger.level
    dynify_logger.setLevel(logging.WARNING)
    try:
        finetune(model=tiny_model(), data=splits, **small)
    finally:
        dynify_logger.setLevel(level)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_training_diverged_is_one_class() -> None:
    assert TrainingDiverged is dynify.errors.TrainingDiverged
    assert dynify.train.loop.TrainingDiverged is TrainingDiverged
    assert not issubclass(TrainingDiverged, DynifyError)  # a failed run, not bad input


def test_cli_divergence_is_exit_1_one_line(tmp_path: Path, splits: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["finetune", "test_resnet", "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    assert main([*argv, "--lr", "1e30", "--output", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("dynify finetune: error: loss became ")
    assert "no checkpoint was written before it" in lines[0] and captured.out == ""
    assert not (out / "checkpoint.pth").exists()
