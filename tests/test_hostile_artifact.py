"""Hostile and damaged artifacts: loading one builds the architecture and reads the file's own
tensors, nothing else (no URL fetched, no cache written, no other file read), and every bad
metadata field is one line naming the key.

The artifacts here are forged: a good artifact's tensors written again by safetensors with
crafted metadata, as anyone could.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import dynify
from dynify.artifact import FORMAT, read_info
from dynify.cli import main
from dynify.errors import DynifyError

warnings.filterwarnings("ignore", category=UserWarning)

SIZE = (3, 32, 32)

# Every file opened by this process while a test watches (sys.audit's "open" event): how a
# test proves that a path was never read. Audit hooks cannot be removed, so one hook for the
# module, recording only while a test sets WATCHED.
WATCHED: set[str] = set()
OPENED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and WATCHED and isinstance(args[0], str | Path):
        if str(Path(args[0]).resolve()) in WATCHED:
            OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = timm.create_model("resnet18", num_classes=7).eval()
    converted = dynify.apply(model, "mobile", input_size=SIZE)
    return dynify.save(converted, tmp_path_factory.mktemp("good") / "good.safetensors")


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def forge(good: Path, target: Path, **fields: Any) -> Path:
    """``good``'s tensors under ``target`` with metadata fields replaced (JSON-encoded unless
    given as str)."""
    meta = _metadata(good)
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(load_file(str(good)), str(target), metadata=meta)
    return target


def _plan(good: Path) -> dict[str, Any]:
    return json.loads(_metadata(good)["plan"])


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server recording every request it gets."""
    requests: ClassVar[list[str]] = []
    handler = type("Handler", (_Recorder,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_server_records_requests(server: tuple[str, list[str]]) -> None:
    """The recorder works (so an empty record below means no request was made)."""
    import urllib.request

    url, requests = server
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/probe.pth", timeout=5)
    assert requests == ["/probe.pth"]


def test_pretrained_url_and_cache_dir_are_refused(
    good: Path, tmp_path: Path, server: tuple[str, list[str]], capsys
) -> None:
    url, requests = server
    cache = tmp_path / "cache"
    cache.mkdir()
    hostile = forge(
        good,
        tmp_path / "hostile.safetensors",
        model_kwargs={
            "num_classes": 7,
            "pretrained": True,
            "pretrained_cfg_overlay": {"url": f"{url}/weights.pth", "hf_hub_id": None},
            "cache_dir": str(cache),
        },
    )
    for attempt in (read_info, dynify.load):
        with pytest.raises(DynifyError, match=r"model_kwargs: 'pretrained' is not accepted"):
            attempt(hostile)
    out_file = tmp_path / "again.safetensors"
    code = main(["convert", "--from", str(hostile), "--output", str(out_file)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "'pretrained' is not accepted" in err
    assert requests == []
    assert list(cache.iterdir()) == []
    assert not out_file.exists()


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_local_files_named_in_kwargs_are_never_read(good: Path, tmp_path: Path, key: str) -> None:
    secret = tmp_path / "secret.pth"
    torch.save({"fc.weight": torch.zeros(7, 512)}, secret)
    value = str(secret) if key == "checkpoint_path" else {"file": str(secret)}
    extra = {"pretrained": True} if key == "pretrained_cfg_overlay" else {}
    hostile = forge(good, tmp_path / "h.safetensors", model_kwargs={key: value, **extra})
    OPENED.clear()
    WATCHED.add(str(secret.resolve()))
    try:
        with pytest.raises(DynifyError, match="is not accepted"):
            dynify.load(hostile)
    finally:
        WATCHED.clear()
    assert OPENED == []


def test_the_open_watch_sees_a_read(tmp_path: Path) -> None:
    """The audit hook records a real read (so an empty record above means no read)."""
    secret = tmp_path / "secret.pth"
    torch.save({"x": torch.zeros(1)}, secret)
    OPENED.clear()
    WATCHED.add(str(secret.resolve()))
    try:
        torch.load(secret, weights_only=True)
    finally:
        WATCHED.clear()
    assert OPENED == [str(secret)]
    OPENED.clear()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": -1}, "num_classes must be an integer from 1 to 1,048,576, got -1"),
        ({"num_classes": True}, "num_classes must be an integer from 1 to 1,048,576, got True"),
        ({"in_chans": "3"}, "in_chans must be an integer from 1 to 1,048,576, got '3'"),
        ({"num_classes": 2**62}, "num_classes must be an integer from 1 to 1,048,576, got 4611"),
        ({"channels": [8, 2**62]}, r"channels must be a list of 1 to 16 integers from 1 to 1,0"),
        ({"stem_width": 2**33}, "stem_width must be an integer from 1 to 1,048,576, got 8589"),
        ({"global_pool": "evil"}, "global_pool must be one of '', 'avg'"),
        ({"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\), got 1.0"),
        ({"drop_path_rate": -0.1}, r"drop_path_rate must be a number in \[0, 1\)"),
        ({"features_only": True}, "'features_only' is not accepted"),
        ([1, 2], "'model_kwargs' must be a JSON object, got list"),
    ],
)
def test_bad_model_kwargs_name_the_key(
    good: Path, tmp_path: Path, kwargs: Any, message: str
) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", model_kwargs=kwargs)
    with pytest.raises(DynifyError, match=message) as info:
        dynify.load(hostile)
    assert str(hostile) in str(info.value) and "\n" not in str(info.value)


def test_unknown_model_name(good: Path, tmp_path: Path) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", model_name="resnet18; rm -rf /")
    with pytest.raises(DynifyError, match=r"model_name: unknown model 'resnet18; rm -rf /'"):
        read_info(hostile)


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def _layer_edit(good: Path, index: int, section: str, **changes: Any) -> dict[str, Any]:
    plan = _plan(good)
    plan["layers"][index][section].update(changes)
    return plan


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (lambda g: _without(_plan(g), "layers"), r"plan: layers: missing \(required\)"),
        (
            lambda g: _layer_edit(g, 1, "settings", experts=-1),
            r"plan: layers\[1\]\.settings\.experts: expected an integer >= 1, got -1",
        ),
        (
            lambda g: _layer_edit(g, 1, "settings", experts="4"),
            r"layers\[1\]\.settings\.experts: expected an integer >= 1, got '4'",
        ),
        (
            lambda g: _layer_edit(g, 1, "settings", attention="evil"),
            r"layers\[1\]\.settings\.attention: got 'evil'; accepted: softmax, sigmoid",
        ),
        (
            lambda g: _layer_edit(g, 1, "settings", exec="import os"),
            r"layers\[1\]\.settings\.exec: unknown key",
        ),
        (
            lambda g: _layer_edit(g, 2, "site", in_channels=0),
            r"layers\[2\]\.site\.in_channels: expected an integer >= 1, got 0",
        ),
        (
            lambda g: _layer_edit(g, 2, "site", kernel_size=[3]),
            r"layers\[2\]\.site\.kernel_size: expected two integers >= 1",
        ),
        (
            lambda g: _layer_edit(g, 2, "settings", temperature={"start": -1}),
            r"layers\[2\]\.settings\.temperature\.start: expected a number > 0",
        ),
        (lambda g: {**_plan(g), "layers": {"a": 1}}, r"plan: layers: expected a list"),
        (lambda g: {**_plan(g), "input_size": [3, 0, 32]}, r"input_size\[1\]"),
        (lambda g: {**_plan(g), "op_counts": {"ops": [[1]], "params": 3}}, r"op_counts\.ops\[0\]"),
        (lambda g: {**_plan(g), "surprise": 1}, r"plan: surprise: unknown key"),
        (
            lambda g: {**_plan(g), "layers": [{**_plan(g)["layers"][0], "settings": None}]},
            r"layers\[0\]\.settings: expected a mapping, got None",
        ),
    ],
)
def test_bad_plan_names_the_key(good: Path, tmp_path: Path, plan: Any, message: str) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", plan=plan(good))
    for attempt in (read_info, dynify.load):
        with pytest.raises(DynifyError, match=message) as info:
            attempt(hostile)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"plan": "{not json"}, r"'plan' is not JSON"),
        ({"plan": "[1, 2]"}, r"'plan' must be a JSON object, got list"),
        ({"model_kwargs": '"num_classes"'}, r"'model_kwargs' must be a JSON object, got str"),
        ({"extra": "[]"}, r"'extra' must be a JSON object, got list"),
        ({"plan": "[" * 100_000 + "]" * 100_000}, r"'plan' is not JSON \(nested too deeply\)"),
        ({"plan": None}, r"'plan' is missing"),
    ],
)
def test_damaged_metadata_fields(good: Path, tmp_path: Path, fields: dict, message: str) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", **fields)
    with pytest.raises(DynifyError, match=message):
        read_info(hostile)


def test_huge_metadata_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    save_file(
        {"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "pad": "x" * 17 * 2**20}
    )
    with pytest.raises(DynifyError, match=r"header is 17 MiB, more than the 16 MiB"):
        read_info(path)


def test_header_longer_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(DynifyError, match="is not a safetensors file"):
        read_info(path)


def test_save_refuses_what_load_would(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", num_classes=7).eval()
    converted = dynify.apply(model, "mobile", input_size=SIZE)
    target = tmp_path / "x.safetensors"
    with pytest.raises(DynifyError, match=r"model_kwargs: 'checkpoint_path' is not accepted"):
        dynify.save(converted, target, model_kwargs={"checkpoint_path": "/etc/passwd"})
    with pytest.raises(DynifyError, match=r"model_name: unknown model 'not_a_model'"):
        dynify.save(converted, target, model_name="not_a_model")
    assert list(tmp_path.iterdir()) == []


def test_accepted_kwargs_round_trip(tmp_path: Path) -> None:
    kwargs = {"num_classes": 5, "global_pool": "max", "drop_rate": 0.2, "drop_path_rate": 0.1}
    model = timm.create_model("resnet18", **kwargs).eval()
    converted = dynify.apply(model, "mobile", input_size=SIZE)
    path = dynify.save(converted, tmp_path / "k.safetensors", model_kwargs=kwargs)
    assert read_info(path)["model_kwargs"] == kwargs
    loaded = dynify.load(path).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    assert loaded.drop_rate == 0.2
    assert isinstance(loaded.global_pool.pool, nn.AdaptiveMaxPool2d)


def test_every_good_artifact_still_loads(good: Path) -> None:
    info = read_info(good)
    assert info.plan.layers == dynify.Plan.from_dict(_plan(good)).layers
    loaded = dynify.load(good)
    assert len(dynify.plan_of(loaded).converted) == len(info.plan.converted) > 0


def test_an_expert_bomb_in_the_plan_is_refused_before_building(good: Path, tmp_path: Path) -> None:
    import time

    layers = _plan(good)["layers"]
    index = next(i for i, lp in enumerate(layers) if lp["settings"]["convert"])
    plan = _layer_edit(good, index, "settings", experts=10**9)
    hostile = forge(good, tmp_path / "h.safetensors", plan=plan)
    start = time.perf_counter()
    name = layers[index]["site"]["name"]
    with pytest.raises(DynifyError, match=rf"tensor '{name}.weight' is \[4, .*\] in the file, "):
        dynify.load(hostile)
    assert time.perf_counter() - start < 5


def test_experts_the_file_does_not_hold_are_refused_before_allocating(
    good: Path, tmp_path: Path
) -> None:
    """Every converted layer at 200 experts beside one one-element tensor (17 KB): refused
    from the header alone, not after building an 8.5 GB model (the reviewer's finding)."""
    import resource
    import time

    plan = _plan(good)
    for layer in plan["layers"]:
        if layer["settings"]["convert"]:
            layer["settings"]["experts"] = 200
    hostile = tmp_path / "h.safetensors"
    save_file(
        {"w": torch.zeros(1)}, str(hostile), metadata={**_metadata(good), "plan": json.dumps(plan)}
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(
        DynifyError, match=r"weights do not fit resnet18 as planned: tensor"
    ) as info:
        dynify.load(hostile)
    assert time.perf_counter() - start < 5 and "\n" not in str(info.value)
    # The 200-expert model would take over 1 GB more than the process ever used so far.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20


def test_weights_that_do_not_fit_are_reported_in_whole_words(good: Path, tmp_path: Path) -> None:
    import re

    tensors = {k: v for k, v in load_file(str(good)).items() if not k.startswith("layer")}
    tensors["x" * 2**20] = torch.zeros(1)
    hostile = tmp_path / "h.safetensors"
    save_file(tensors, str(hostile), metadata=_metadata(good))
    with pytest.raises(DynifyError, match="weights do not fit resnet18 as planned") as info:
        dynify.load(hostile)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500
    assert re.search(r"tensor 'layer1\.0\.conv1\.weight' \(\[\d+, 64, 3, 3\]\) is not", message)
    del tensors["x" * 2**20]
    tensors.update({k: v for k, v in load_file(str(good)).items() if k.startswith("layer")})
    tensors["x" * 2**20] = torch.zeros(1)  # an unexpected key of a megabyte: quoted short
    save_file(tensors, str(hostile), metadata=_metadata(good))
    with pytest.raises(DynifyError, match=r"the file's tensor 'x+… is not in the model") as info:
        dynify.load(hostile)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 10**6}, r"tensor 'fc.weight' is \[7, 512\] in the file, \[1000000, 512\]"),
        ({"num_classes": 10**9}, r"num_classes must be an integer from 1 to 1,048,576"),
        ({"layers": [10**9, 2, 2, 2]}, r"layers must be a list of 1 to 16 integers from 1 to"),
    ],
)
def test_an_architecture_bomb_in_model_kwargs_is_refused_before_building(
    good: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    import time

    hostile = forge(good, tmp_path / "h.safetensors", model_kwargs=kwargs)
    start = time.perf_counter()
    with pytest.raises(DynifyError, match=message) as info:
        dynify.load(hostile)
    assert time.perf_counter() - start < 5 and "\n" not in str(info.value)


def test_architecture_kwargs_users_pass_round_trip(tmp_path: Path) -> None:
    kwargs = {"num_classes": 4, "channels": [8, 16, 24, 32], "stem_width": 8}
    model = timm.create_model("test_resnet", **kwargs).eval()
    converted = dynify.apply(model, "mobile", input_size=SIZE)
    path = dynify.save(converted, tmp_path / "t.safetensors", model_kwargs=kwargs)
    loaded = dynify.load(path).eval()
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # resnet asserts its pool is one SelectAdaptivePool2d knows (an AssertionError).
        ({"global_pool": "token"}, r"model_kwargs \{'global_pool': 'token'\} do not build a"),
        ({"global_pool": "map"}, r"model_kwargs \{'global_pool': 'map'\} do not build a"),
        ({"embed_dim": 64}, r"do not build a resnet18 \(TypeError: "),
    ],
)
def test_kwargs_the_architecture_rejects_are_one_line(
    good: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", model_kwargs=kwargs)
    with pytest.raises(DynifyError, match=message) as info:
        dynify.load(hostile)
    assert str(hostile) in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is not None  # the original error is kept for debugging


def test_a_meta_build_that_fails_is_refused_not_skipped(
    good: Path, tmp_path: Path, monkeypatch
) -> None:
    """The old size check returned silently when the meta build failed (stem_width 2**33),
    leaving the real build to hit the allocator."""
    calls: list[str] = []
    real = timm.create_model

    def meta_fails(*args: Any, **kwargs: Any) -> nn.Module:
        if torch.empty(0).device.type == "meta":
            raise RuntimeError("Storage size calculation overflowed")
        calls.append("real build")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", meta_fails)
    with pytest.raises(DynifyError, match=r"do not build a resnet18 \(RuntimeError: Storage"):
        dynify.load(good)
    assert calls == []


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ([3, 10**6, 10**6], r"input_size\[1\]: expected three integers .* to 8192, got 1,000,000"),
        ([5000, 32, 32], r"input_size\[0\]: expected three integers \(C, H, W\), C from 1 to 4096"),
    ],
)
def test_a_huge_input_size_is_refused(good: Path, tmp_path: Path, size: list, message: str) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", plan={**_plan(good), "input_size": size})
    with pytest.raises(DynifyError, match=message):
        read_info(hostile)


@pytest.mark.parametrize(
    "fields",
    [
        {"model_kwargs": {"x" * 8 * 2**20: 1}},
        {"model_kwargs": {"channels": list(range(1, 10**6))}},
        {"model_kwargs": {"channels": ["x" * 2**20]}},
        {"plan": {"layers": [], "input_size": "x" * 4 * 2**20}},
        {"plan": {"layers": [], "input_size": [3, 32, 32], "x" * 4 * 2**20: 1}},
        {"plan": {"layers": [], "input_size": [3, 32, 32], "recipe": ["x" * 4 * 2**20]}},
    ],
)
def test_messages_quote_huge_values_short(good: Path, tmp_path: Path, fields: dict) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", **fields)
    with pytest.raises(DynifyError) as info:
        read_info(hostile)
    # The path, a quoted value of 80 characters and at most the list of accepted keys.
    assert len(str(info.value)) < 400 + len(str(hostile)), str(info.value)[:500]


@pytest.mark.parametrize(
    ("name", "found"),
    [("", "ResNet"), ("fc", "Linear"), ("layer1.0.nosuch", "no such module")],
)
def test_a_plan_layer_that_is_no_conv_names_the_file_and_the_key(
    good: Path, tmp_path: Path, name: str, found: str
) -> None:
    layers = _plan(good)["layers"]
    index = next(i for i, lp in enumerate(layers) if lp["settings"]["convert"])
    hostile = forge(
        good, tmp_path / "h.safetensors", plan=_layer_edit(good, index, "site", name=name)
    )
    with pytest.raises(DynifyError) as info:
        dynify.load(hostile)
    message = str(info.value)
    assert message.startswith(f"{str(hostile)!r}: plan: layers[{index}].site.name: {name!r}")
    assert "is not a conv resnet18 can convert" in message and found in message


@pytest.mark.parametrize("name", ["resnet18.nosuchtag", "resnet18.hf-hub:x", "resnet18.a1_in1k"])
def test_a_tagged_model_name_is_refused(good: Path, tmp_path: Path, name: str, capsys) -> None:
    hostile = forge(good, tmp_path / "h.safetensors", model_name=name)
    with pytest.raises(DynifyError, match=rf"model_name: '{name}' is not a plain architecture"):
        read_info(hostile)
    out_file = tmp_path / "again.safetensors"
    code = main(["convert", "--from", str(hostile), "--output", str(out_file)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_file.exists()


def test_a_model_bigger_than_the_memory_is_refused_before_building(good: Path, monkeypatch) -> None:
    from dynify import _memory

    monkeypatch.setattr(
        _memory, "available_memory", lambda device: 2**20 if device.type == "cpu" else None
    )
    built_on: list[str] = []
    real = timm.create_model

    def recording(*args: Any, **kwargs: Any) -> nn.Module:
        built_on.append(torch.empty(0).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    with pytest.raises(
        DynifyError, match=r"the model takes [\d,.]+ [MG]iB; this machine has 1 MiB"
    ):
        dynify.load(good)
    assert built_on == ["meta"]
