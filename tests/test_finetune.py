"""dynify.train.finetune and ``dynify finetune`` on tiny image sets the tests write.

References are independent of the code under test: the uninterrupted run for resume, the
schedule formulas for the temperature, a hash of the checkpoint file for "left intact".
"""

from __future__ import annotations

import hashlib
import json
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
from dynify.cli import main
from dynify.errors import DynifyError
from dynify.layers import DynamicConv2d
from dynify.train import StopTraining, TrainingDiverged, evaluate, finetune, load_data

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
    transform = timm.data.create_transform(
        input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    model.eval()
    with torch.no_grad():
        correct = sum(
            int(model(transform(img)[None]).argmax() == label)
            for img, label in load_data(splits).val
        )
    assert 100 * correct / 32 == history[-1]["val_top1"]
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

    with pytest.raises(DynifyError, match=r"--batch-size 16, this run asks --batch-size 8 \("):
        finetune(
            model=tiny_model(),
            data=splits,
            output=tmp_path / "part",
            resume=True,
            **dict(settings, batch_size=8),
        )
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
    assert result.epochs == 1 and 0 <= result.top1 <= 100
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


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
    assert "classifies 1000 classes, the data has 4" in err and "--num-classes 4" in err
    assert not (tmp_path / "run").exists()
    err = _one_line(capsys, [*argv, "--num-classes", "3", "--output", str(tmp_path / "run")])
    assert "--num-classes 3: the data has 4 classes" in err


def test_cli_num_classes_replaces_an_artifacts_classifier(capsys, tmp_path, splits, artifact_1000):
    out = tmp_path / "run"
    argv = ["finetune", str(artifact_1000), "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    argv += ["--train-images", "16", "--val-images", "4"]
    assert main([*argv, "--num-classes", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "replaced the artifact's 1000-class classifier by a new 4-class one" in printed
    model = dynify.load(out / "model.safetensors")
    assert model.num_classes == 4 and model.fc.out_features == 4
    before = dynify.load(artifact_1000)  # the rest of the network is the artifact's plan
    assert [lp.name for lp in dynify.plan_of(model).converted] == [
        lp.name for lp in dynify.plan_of(before).converted
    ]


def test_cli_num_classes_builds_a_timm_model_with_it(capsys, tmp_path, splits, monkeypatch):
    import dynify.train

    built: list[nn.Module] = []

    def capture(*, model: nn.Module, **kwargs: object) -> None:
        built.append(model)
        raise DynifyError("captured")

    monkeypatch.setattr(dynify.train, "finetune", capture)
    argv = ["finetune", "test_resnet", "--data", str(splits), "--epochs", "1", *QUICK_CLI]
    argv += ["--output", str(tmp_path / "run")]
    assert "captured" in _one_line(capsys, [*argv, "--num-classes", "4"])
    assert built[0].num_classes == 4 and built[0].fc.out_features == 4
    err = _one_line(capsys, [*argv, "--num-classes", "10"])
    assert "--num-classes 10: the data has 4 classes" in err and len(built) == 1


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
        (["--train-images", "8"], "--train-images 16, this run asks --train-images 8"),
        (["--train-images", "16", "--val-images", "4"], "no --val-images, this run asks --val-im"),
        (["--train-images", "16", "--lr", "0.5"], "--lr 0.00625, this run asks --lr 0.5"),
        (["--train-images", "16", "--no-aug"], "no --no-aug, this run asks --no-aug"),
        (["--train-images", "16", "--seed", "3"], "--seed 0, this run asks --seed 3"),
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
    assert "has finished 2 epochs, this run asks --epochs 1" in err
