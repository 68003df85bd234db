"""``dynify.export`` and ``dynify export``: ONNX and torch.export round trips, checked.

Every export is compared here again, independently of the check the export itself runs:
onnxruntime (or ``torch.export.load``) on the written file, at batch sizes the export did
not check, against the eager model. The default run exports the tiny ``test_resnet``; the
many timm families (and every kind) are ``slow``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify import export
from dynify.cli import main

ort = pytest.importorskip("onnxruntime")

TINY = {"channels": [8, 16, 24, 32], "stem_width": 8}
SIZE = (3, 32, 32)


def _tiny_converted(recipe: str | None = None) -> nn.Module:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, **TINY).eval()
    return dynify.apply(model, recipe, input_size=SIZE).eval()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def _onnx_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    return torch.from_numpy(session.run(None, {graph_input.name: x.numpy()})[0])


def _program_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    with open(path, "rb") as f:
        module = torch.export.load(f).module()
    with torch.no_grad():
        return module(x)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "tiny.dynify.safetensors"
    torch.manual_seed(0)
    # Few dynamic layers (the last conv of each block): the ONNX export stays quick.
    dynify.save(
        _tiny_converted("mobile"),
        path,
        model_name="test_resnet",
        model_kwargs={"num_classes": 10, **TINY},
    )
    return path


# -- the Python API -------------------------------------------------------------------------


def test_torch_export_round_trip_with_a_dynamic_batch(tmp_path: Path) -> None:
    model = _tiny_converted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    report = export.export_program(model, tmp_path / "m.pt2")
    assert report.format == "torch-export" and report.batch == "dynamic"
    assert report.input_size == tuple(dynify.plan_of(model).input_size) == SIZE
    assert [b for b, _ in report.errors] == [1, 3]
    assert report.max_error is not None and report.max_error <= export.TOLERANCE
    # Every BatchNorm of test_resnet follows a conv: all fused in the exported copy.
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(p.norm for p in report.fused) == sorted(norms)
    # The user's model is untouched: its mode and weights.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    for b in (2, 5):
        x = torch.randn(b, *SIZE)
        assert _relative_error(_program_outputs(tmp_path / "m.pt2", x), _eager(model, x)) < 1e-4
    assert _only_file(tmp_path) == ["m.pt2"]


def test_onnx_fixed_batch_of_a_static_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    path = tmp_path / "s.onnx"
    report = export.export_onnx(
        model, path, batch=2, input_size="3,8,8", opset=18, fuse_batchnorm=False
    )
    assert (report.batch, report.input_size, report.opset, report.fused) == (2, (3, 8, 8), 18, ())
    assert [b for b, _ in report.errors] == [2]
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 8, 8]
    x = torch.randn(2, 3, 8, 8)
    assert _relative_error(_onnx_outputs(tmp_path / "s.onnx", x), _eager(model, x)) < 1e-4


def test_a_graph_that_disagrees_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export._onnxruntime_runner

    def wrong(path: Path, batch: export.Batch):
        run = real(path, batch)
        return lambda x: run(x) * 1.01

    monkeypatch.setattr(export, "_onnxruntime_runner", wrong)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    with pytest.raises(dynify.DynifyError, match=r"at batch 1 the max error .* 1\.00e-02") as err:
        export.export_onnx(model, tmp_path / "s.onnx", input_size=(3, 8, 8))
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    assert _only_file(tmp_path) == []


class _Moody(nn.Module):
    """Branches on its input's values: no graph can record that."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if x.sum() > 0 else self.inner(-x)


def test_a_module_that_cannot_be_exported_is_named(tmp_path: Path) -> None:
    model = _tiny_converted()
    model.layer2[0].conv1 = _Moody(model.layer2[0].conv1)
    with pytest.raises(dynify.DynifyError) as err:
        export.export_program(model, tmp_path / "m.pt2")
    message = str(err.value)
    assert message.startswith("cannot export module 'layer2.0.conv1' (_Moody) to torch.export: ")
    assert "branches on a tensor's values" in message and "\n" not in message
    assert err.value.__cause__ is not None
    assert _only_file(tmp_path) == []


def test_an_onnx_translation_failure_names_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the portable formulation, a dynamic layer's grouped conv has a group count
    that depends on the batch, which ONNX cannot take: the node the translator failed on
    names the layer."""
    monkeypatch.setattr(export, "portable", lambda model: contextlib.nullcontext())
    model = _tiny_converted("mobile")
    first = dynify.plan_of(model).converted[0].name
    with pytest.raises(dynify.DynifyError) as err:
        export.export_onnx(model, tmp_path / "m.onnx", optimize=False)
    message = str(err.value)
    assert message.startswith(f"cannot export module '{first}' (DynamicConv2d) to ONNX: ")
    assert "Unsupported attribute type" in message and "\n" not in message
    assert _only_file(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch must be 'dynamic' or an integer in"),
        ({"batch": "many"}, "batch must be 'dynamic' or an integer in"),
        ({"batch": 2000}, r"\[1, 1024\], got 2000"),
        ({"input_size": (3, 0, 8)}, "input_size must be"),
        ({"opset": 7}, r"opset must be an integer in \[18, "),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(dynify.DynifyError, match=match):
        export.export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "x.onnx", **kwargs)
    assert _only_file(tmp_path) == []


def test_missing_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    hint = r'onnxruntime is not installed\): pip install "dynify\[export\]"'
    with pytest.raises(dynify.DynifyError, match=hint):
        export.export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "x.onnx", input_size=(3, 8, 8))


def test_the_names_are_public() -> None:
    assert dynify.export_onnx is export.export_onnx
    assert dynify.export_program is export.export_program


# -- the command line ------------------------------------------------------------------------


def _refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's own refusals (a bad choice)
        code = done.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dynify export: error: "), err
    return lines[0]


def test_cli_exports_onnx_with_a_dynamic_batch(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path
) -> None:
    out = tmp_path / "tiny.onnx"
    code = main(["export", str(artifact), "--format", "onnx", "--output", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert err == "", err  # the exporters' own chatter stays off stderr
    assert "onnx, opset " in stdout and "batch dynamic, input 3x32x32, " in stdout
    assert "BatchNorm(s) fused into the convs before them" in stdout
    assert "check (onnxruntime against the eager model): max relative error batch 1 " in stdout
    assert f"wrote {out}" in stdout
    assert _only_file(tmp_path) == ["tiny.onnx"]
    model = dynify.load(artifact).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch
    for b in (2, 5):
        x = torch.randn(b, *SIZE)
        assert _relative_error(_onnx_outputs(out, x), _eager(model, x)) < 1e-4


def test_cli_exports_a_torch_export_program_at_a_fixed_batch(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path
) -> None:
    out = tmp_path / "tiny.pt2"
    argv = ["export", str(artifact), "--format", "torch-export", "--batch", "4"]
    code = main([*argv, "--output", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "torch-export: batch 4, input 3x32x32" in stdout and "batch 4 " in stdout
    x = torch.randn(4, *SIZE)
    model = dynify.load(artifact).eval()
    assert _relative_error(_program_outputs(out, x), _eager(model, x)) < 1e-4


def test_cli_bad_format(capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path) -> None:
    out = tmp_path / "x.bin"
    line = _refused(capsys, ["export", str(artifact), "--format", "tflite", "--output", str(out)])
    assert "invalid choice: 'tflite'" in line and "'onnx', 'torch-export'" in line
    assert _only_file(tmp_path) == []


def test_cli_unknown_artifact(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    line = _refused(capsys, ["export", str(missing), "--output", str(tmp_path / "x.onnx")])
    assert f"artifact '{missing}': no such file" in line
    assert _only_file(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_cli_unwritable_output(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _refused(capsys, ["export", str(artifact), "--output", str(locked / "x.onnx")])
    finally:
        locked.chmod(0o700)
    assert "--output" in line and "is not writable" in line
    assert _only_file(locked) == []


def test_cli_output_under_a_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path
) -> None:
    (tmp_path / "plain").write_text("")
    line = _refused(capsys, ["export", str(artifact), "--output", str(tmp_path / "plain" / "x")])
    assert "--output" in line and "is a file, not a folder" in line


def test_cli_output_is_a_folder(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path
) -> None:
    line = _refused(capsys, ["export", str(artifact), "--output", str(tmp_path)])
    assert "--output" in line and "is a folder; give a file name" in line


def test_cli_bad_flags_before_any_work(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    # The artifact does not exist: the flags are refused before it is looked at.
    missing, out = str(tmp_path / "missing.safetensors"), str(tmp_path / "x.onnx")
    assert "--batch must be 'dynamic' or" in _refused(
        capsys, ["export", missing, "--batch", "0", "--output", out]
    )
    assert "--opset must be an integer in [18, " in _refused(
        capsys, ["export", missing, "--opset", "9", "--output", out]
    )
    assert "--opset is for --format onnx" in _refused(
        capsys, ["export", missing, "--format", "torch-export", "--opset", "18", "--output", out]
    )
    assert "--input-size must be" in _refused(
        capsys, ["export", missing, "--input-size", "3,a,8", "--output", out]
    )


def test_cli_missing_extra(
    capsys: pytest.CaptureFixture, tmp_path: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    line = _refused(capsys, ["export", str(artifact), "--output", str(tmp_path / "x.onnx")])
    assert line.endswith('(onnx is not installed): pip install "dynify[export]"'), line
    assert _only_file(tmp_path) == []


# -- many families, every kind (slow) --------------------------------------------------------

# (timm name, recipe, input size): the families the issue names, a grouped-conv and a
# depthwise-heavy one, TF-'SAME' padding, and each kind on at least one model.
FAMILIES = [
    ("resnet18", "odconv", 64),
    ("mobilenetv2_050", None, 64),
    ("mobilenetv2_050", "dcd", 64),
    ("mobilenetv3_small_050", None, 64),
    ("efficientnet_b0", "condconv", 64),
    ("tf_efficientnet_b0", None, 64),
    ("regnetx_002", None, 64),  # grouped convs
    ("convnext_atto", None, 64),
    ("densenet121", None, 32),
    ("resnext26ts", None, 64),  # grouped convs
    ("lcnet_050", None, 64),  # depthwise-heavy
    ("test_resnet", "condconv", 32),
]


# torch.export programs keep the layers' eager formulation, which test_kinds exports for
# every kind already: one family per kind here. ResNet is resnet18 with ODConv and the
# tiny test_resnet, RegNet is regnetx (regnety and a DY-CNN resnet18 added a minute).
PROGRAM_FAMILIES = {"resnet18-odconv", "mobilenetv2_050-dcd", "efficientnet_b0-condconv",
                    "regnetx_002-dycnn"}  # fmt: skip
ROUND_TRIPS = [
    (name, recipe, side, fmt)
    for name, recipe, side in FAMILIES
    for fmt in ("onnx", "torch-export")
    if fmt == "onnx" or f"{name}-{recipe or 'dycnn'}" in PROGRAM_FAMILIES
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "recipe", "side", "fmt"),
    ROUND_TRIPS,
    ids=[f"{n}-{r or 'dycnn'}-{f}" for n, r, _, f in ROUND_TRIPS],
)
def test_family_round_trip(
    tmp_path: Path, name: str, recipe: str | None, side: int, fmt: str
) -> None:
    kwargs = TINY if name == "test_resnet" else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    size = (3, side, side)
    # The last stage's convs only: every conv type of the family is there, and the graph of
    # a fully converted densenet121 took 6.5 minutes to export (31 s like this).
    last_stage = {
        "defaults": {"convert": False, "kind": recipe or "dycnn"},
        "rules": [{"select": {"stage": [-1]}, "convert": True}],
    }
    converted = dynify.apply(model, last_stage, input_size=size).eval()
    assert dynify.plan_of(converted).converted
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2")
    if fmt == "onnx":
        # onnxscript's optimiser is 40% of an export and changes nothing the check sees.
        report = export.export_onnx(converted, out, optimize=False)
    else:
        report = export.export_program(converted, out)
    assert report.max_error is not None and report.max_error <= export.TOLERANCE
    outputs = _onnx_outputs if fmt == "onnx" else _program_outputs
    for b in (2, 4):
        x = torch.randn(b, *size)
        assert _relative_error(outputs(out, x), _eager(converted, x)) < 1e-4


def test_the_command_lines_formats_are_the_librarys() -> None:
    """--help needs no torch, so the parser keeps its own copy of the formats."""
    from dynify.cli import export as command

    assert command.FORMATS == export.FORMATS
