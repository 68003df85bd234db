"""``dynify convert``: exit codes, output, the artifact it writes, and nothing half-written.

Most runs call ``dynify.cli.main`` in-process (fast); a few run the real command in a
subprocess to check what a user sees on stderr (one line, no traceback) and the README's
main-job command. The wheel test checks that bundled recipes ship inside the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import timm
import torch

import dynify
from dynify.cli import main

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
MOBILE = str(ROOT / "recipes" / "mobile.yaml")
SMALL = ["--input-size", "3,64,64"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["convert", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "dynify", "convert", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("dynify convert: error: ")
    return lines[0]


# -- success ------------------------------------------------------------------------------


def test_convert_prints_plan_checks_and_writes(capsys, tmp_path: Path) -> None:
    out_path = tmp_path / "r18.safetensors"
    code, out, err = run_cli(capsys, "resnet18", "--recipe", MOBILE, "--output", str(out_path),
                             *SMALL)  # fmt: skip
    assert code == 0, err
    assert "resnet18: recipe mobile, input 3x64x64" in out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    for column in ("kind", "conv", "input", "K", "r", "params", "params after"):
        assert column in header
    assert "layer1.0.conv2" in out and "8/20 dynamic" in out
    assert "equivalence: eval output max relative error" in out and ": OK" in out
    assert " in float32 (tolerance" in out or " in float64 (tolerance" in out
    assert f"wrote {out_path}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.safetensors"]

    # The artifact rebuilds the model; the plan is the one printed.
    model = dynify.load(out_path)
    plan = dynify.plan_of(model)
    assert [lp.name for lp in plan.converted] == [
        f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)
    ]
    # ...and the converted model computes what a resnet18 with those weights computes.
    ref = timm.create_model("resnet18").eval()
    own = ref.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in own and v.shape == own[k].shape}
    assert len(state) == len(own) - len(plan.converted)
    for lp in plan.converted:  # at conversion, a layer's K experts average to the kernel
        state[f"{lp.name}.weight"] = model.get_submodule(lp.name).weight.mean(0)
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y, y0 = model.eval()(x), ref(x)
    assert float((y - y0).abs().max() / y0.abs().max()) <= 1e-4


def test_costs_are_counted_at_the_input_size_asked(capsys, tmp_path: Path) -> None:
    from dynify import cost

    out_path = tmp_path / "r18.safetensors"
    code, out, err = run_cli(capsys, "resnet18", "--input-size", "3,32,32", "--output",
                             str(out_path))  # fmt: skip
    assert code == 0, err
    macs = next(line.split() for line in out.splitlines() if line.startswith("MACs "))
    # The reference: the unconverted model counted at 32x32 (not its default 224x224).
    static = cost.count(timm.create_model("resnet18"), input_size=(3, 32, 32)).macs
    converted = cost.count(dynify.load(out_path), input_size=(3, 32, 32)).macs
    assert " ".join(macs[1:3]) == cost.format_count(static), out
    assert " ".join(macs[3:5]) == cost.format_count(converted), out
    # Converting adds the attention and the kernel mixing: more, never fewer, MACs.
    assert static < converted < 3 * static


def test_from_artifact_rebuilds_and_rewrites(capsys, tmp_path: Path) -> None:
    first = tmp_path / "a.safetensors"
    assert run_cli(capsys, "resnet18", "--recipe", "mobile", "--output", str(first), *SMALL)[0] == 0
    code, out, err = run_cli(capsys, "--from", str(first))
    assert code == 0, err
    assert "resnet18" in out and "8/20 dynamic" in out and f"dynify {dynify.__version__}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no --output

    second = tmp_path / "b.safetensors"
    assert run_cli(capsys, "--from", str(first), "--output", str(second))[0] == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dynify.load(first).eval()(x), dynify.load(second).eval()(x))


def test_default_output_name_in_current_folder(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "mobilenetv2_100", "--recipe", "mobile", *SMALL)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["mobilenetv2_100.dynify.safetensors"]


def test_checkpoint_and_num_classes(capsys, tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=5)
    with torch.no_grad():
        source.fc.weight.fill_(0.25)
    ckpt = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    out_path = tmp_path / "r18.safetensors"
    code, _, err = run_cli(capsys, "resnet18", "--checkpoint", str(ckpt), "--num-classes", "5",
                           "--output", str(out_path), *SMALL)  # fmt: skip
    assert code == 0, err
    model = dynify.load(out_path)
    assert model.fc.out_features == 5 and torch.all(model.fc.weight == 0.25)
    assert torch.equal(model.conv1.weight, source.conv1.weight)  # the stem stays static


# -- errors: exit 2, one line, nothing written --------------------------------------------


def test_unknown_model_names_closest_timm_names(tmp_path: Path) -> None:
    proc = run_subprocess("resnet5O", "--output", "x.safetensors", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "unknown model 'resnet5O'" in line and "closest timm names" in line
    assert "resnet50" in line
    assert list(tmp_path.iterdir()) == []


def test_misspelt_recipe_key_gives_file_and_line(capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  experts: 4\nrules:\n  - select: {kernal_size: 1}\n"
                      "    convert: true\n")  # fmt: skip
    out_path = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "resnet18", "--recipe", str(recipe), "--output",
                             str(out_path), *SMALL)  # fmt: skip
    assert code == 2
    line = one_error_line(err)
    assert f"{recipe}:4: rules[0].select.kernal_size" in line
    assert "did you mean 'kernel_size'" in line
    assert not out_path.exists()


@pytest.mark.slow
def test_misspelt_recipe_key_from_the_command_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  expert: 4\n")
    proc = run_subprocess("resnet18", "--recipe", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{recipe}:2: defaults.expert" in one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet18", "--recipe", "mobil"], "did you mean 'mobile'"),
        (["resnet18", "--checkpoint", "missing.pth"], "checkpoint 'missing.pth': no such file"),
        (["resnet18", "--input-size", "3,64"], "--input-size must be three integers C,H,W"),
        (["resnet18", "--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
        (["--from", "missing.safetensors"], "no such file"),
        (["resnet18", "--from", "x.safetensors"], "not both"),
        ([], "MODEL is required"),
        (["vit_tiny_patch16_224", "--recipe", "mobile", "--strict"], "matches no conv"),
        (["vit_tiny_patch16_224", "--input-size", "3,64,64"], "does not run on an input"),
    ],
)
def test_errors_exit_2_and_write_nothing(capsys, tmp_path, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_cuda_requested_without_cuda(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "resnet18", "--device", "cuda", "--output",
                           str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "no CUDA device" in one_error_line(err)


def test_checkpoint_that_does_not_fit(capsys, tmp_path: Path) -> None:
    ckpt = tmp_path / "mnv2.pth"
    torch.save(timm.create_model("mobilenetv2_100").state_dict(), ckpt)
    out_path = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "resnet18", "--checkpoint", str(ckpt), "--output",
                           str(out_path), *SMALL)  # fmt: skip
    assert code == 2
    line = one_error_line(err)
    assert "does not fit ResNet" in line and "missing" in line and "unexpected" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnv2.pth"]
    # Right keys, wrong shapes (another num_classes).
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), ckpt)
    code, _, err = run_cli(capsys, "resnet18", "--checkpoint", str(ckpt), "--output",
                           str(out_path), *SMALL)  # fmt: skip
    assert code == 2 and "of the wrong shape (e.g. fc.weight" in one_error_line(err)
    # Not a checkpoint at all.
    ckpt.write_text("hello")
    code, _, err = run_cli(capsys, "resnet18", "--checkpoint", str(ckpt), *SMALL)
    assert code == 2 and "could not be read" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnv2.pth"]


def test_not_an_artifact(capsys, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "--from", str(junk), "--output", str(tmp_path / "o"))
    assert code == 2 and "not a safetensors file" in one_error_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["junk.safetensors"]


# -- the README's command, and the wheel --------------------------------------------------


@pytest.mark.slow
def test_readme_main_job_command(tmp_path: Path) -> None:
    """`dynify convert resnet50 --recipe recipes/mobile.yaml`, offline, random init."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    exe = Path(sys.executable).with_name("dynify")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dynify"]
    proc = subprocess.run(
        [*cmd, "convert", "resnet50", "--recipe", "recipes/mobile.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "16/53 dynamic" in proc.stdout and ": OK" in proc.stdout
    assert (tmp_path / "resnet50.dynify.safetensors").is_file()


@pytest.mark.slow
def test_wheel_carries_the_bundled_recipes(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("dynify-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ("all", "condconv", "dycnn", "mobile"):
        assert f"dynify/_bundled/recipes/{recipe}.yaml" in names
    assert any(n.startswith("dynify/_bundled/search/") for n in names)

    # Installed from the wheel (not the source tree), a bare name still finds the recipe.
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = (
        "import dynify, dynify.recipe as r; "
        "print(dynify.__file__); print(r.load_recipe('mobile').source)"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    where, source = proc.stdout.split()
    assert where.startswith(str(target)) and source.startswith(str(target / "dynify" / "_bundled"))


def test_convert_and_inspect_share_their_model_arguments() -> None:
    import argparse

    from dynify.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))

    def model_args(command: str) -> dict[str, tuple]:
        shared = {"model", "recipe", "pretrained", "checkpoint", "num_classes", "input_size"}
        return {
            a.dest: (tuple(a.option_strings), a.default, a.metavar, type(a).__name__)
            for a in sub.choices[command]._actions
            if a.dest in shared
        }

    convert, inspect = model_args("convert"), model_args("inspect")
    assert len(convert) == 6
    assert {k: v for k, v in convert.items() if k != "model"} == {
        k: v for k, v in inspect.items() if k != "model"
    }
    for command in ("convert", "inspect"):  # --pretrained and --checkpoint exclude each other
        with pytest.raises(SystemExit):
            sub.choices[command].parse_args(["resnet18", "--pretrained", "--checkpoint", "x"])
    with pytest.raises(SystemExit):  # and --from, for convert
        sub.choices["convert"].parse_args(["--pretrained", "--from", "a.safetensors"])
