"""dynify.models: pretrained weights offline are one whole line at once (no minute of hub
retries), and messages quoting another library's text are cut at word boundaries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm

from dynify import models
from dynify.errors import DynifyError, shorten
from dynify.models import create_model

ROOT = Path(__file__).resolve().parents[1]

TEXT = (
    "Cannot find the requested files in the disk cache and outgoing traffic has been "
    "disabled. To enable hf.co look-ups and downloads online, set 'local_files_only' to False."
)


@pytest.mark.parametrize("limit", [1, 2, 5, 10, 37, 80, 119, 159, 160, len(TEXT), 500])
def test_shorten_cuts_at_a_word_boundary(limit: int) -> None:
    out = shorten(TEXT, limit)
    assert len(out) <= max(limit, 2)
    if len(TEXT) <= limit:
        assert out == TEXT
        return
    assert out.endswith("…")
    kept = out[:-1]
    words = TEXT.split(" ")
    # What is kept is whole words of the text (its last word possibly without trailing
    # punctuation), unless the first word alone is longer than the limit.
    if len(words[0]) >= limit:
        assert TEXT.startswith(kept)
        return
    kept_words = kept.split(" ")
    assert kept_words[:-1] == words[: len(kept_words) - 1]
    assert words[len(kept_words) - 1].startswith(kept_words[-1])
    assert words[len(kept_words) - 1].rstrip(",;:(") == kept_words[-1]


def test_shorten_flattens_lines() -> None:
    assert shorten("Error(s):\n\tMissing key(s): a, b", 100) == "Error(s): Missing key(s): a, b"


def test_unreachable_hub_is_one_line_at_once(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=2.0: False)
    tried: list[str] = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: tried.append(name))
    start = time.perf_counter()
    with pytest.raises(DynifyError) as info:
        create_model("resnet18", pretrained=True)
    assert time.perf_counter() - start < 30  # a hang guard; what counts is below
    message = str(info.value)
    assert "\n" not in message and "cannot be reached" in message
    # The Python argument, which the command line shows as its flag.
    assert "checkpoint=FILE" in message and "HF_HUB_OFFLINE=1" in message
    assert info.value.arguments == ("checkpoint",)
    assert tried == []  # the hub was never tried


def test_hub_check_is_bounded_in_time(monkeypatch) -> None:
    """A name lookup or connect that hangs (the socket timeout does not cover the lookup)
    costs about the timeout, not a minute."""
    import socket

    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(10))
    start = time.perf_counter()
    assert models.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - start < 8  # the lookup hangs for 10 s


def test_offline_setting_is_one_whole_line(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and an empty hub cache: the real command, one line, fast."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
    }
    output = tmp_path / "out.safetensors"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dynify", "convert", "resnet18", "--pretrained",
         "--input-size", "3,32,32", "--output", str(output)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert time.perf_counter() - start < 40  # the interpreter and timm's import included
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "HF_HUB_OFFLINE is set" in lines[0] and "--checkpoint=FILE" in lines[0]
    assert lines[0].rstrip().endswith("instead")  # whole, not cut
    assert not output.exists()


def test_kwargs_a_model_does_not_take_are_one_line() -> None:
    with pytest.raises(DynifyError, match=r"model 'resnet18' does not accept these arguments"):
        create_model("resnet18", img_size=64)


@pytest.mark.parametrize("name", ["test_resnet.nosuchtag", "test_resnet.hf-hub:x"])
def test_a_bad_pretrained_tag_is_one_line(name: str) -> None:
    """timm.is_model ignores the tag; timm.create_model then raised RuntimeError ("Invalid
    pretrained tag"), even without pretrained weights."""
    tag = name.split(".", 1)[1]
    with pytest.raises(DynifyError) as info:
        create_model(name)
    message = str(info.value)
    assert message.startswith(f"unknown pretrained tag {tag!r} of model 'test_resnet'")
    assert "its tags: test_resnet.r160_in1k" in message and "\n" not in message


def test_a_known_tag_still_builds() -> None:
    assert create_model("test_resnet.r160_in1k").pretrained_cfg["tag"] == "r160_in1k"


def test_a_tag_is_refused_where_a_plain_architecture_is_expected() -> None:
    with pytest.raises(DynifyError, match=r"x: 'test_resnet.r160_in1k' is not a plain arch"):
        models.check_model_name("test_resnet.r160_in1k", where="x", plain=True)
    assert models.check_model_name("test_resnet", plain=True) == "test_resnet"


def test_a_huge_class_count_is_one_line(monkeypatch) -> None:
    """--num-classes 1000000000000 was a 384 TB allocation's traceback."""
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was called"))
    with pytest.raises(
        DynifyError, match=r"num_classes must be from 1 to 1,048,576, got 1,0"
    ) as info:
        create_model("test_resnet", num_classes=10**12)
    assert info.value.arguments == ("num_classes",)
    with pytest.raises(DynifyError, match=r"num_classes must be from 1 to"):
        create_model("test_resnet", num_classes=0)


def test_cli_convert_with_a_bad_tag_or_class_count_is_one_line(tmp_path: Path) -> None:
    for args in (["test_resnet.nosuchtag"], ["test_resnet", "--num-classes", str(10**12)]):
        out = tmp_path / "out.safetensors"
        proc = subprocess.run(
            [sys.executable, "-m", "dynify", "convert", *args, "--output", str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, lines
        assert list(tmp_path.iterdir()) == []
