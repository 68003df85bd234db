"""Search spaces: the bundled ones load and make their budgets real; bad files get the
recipe-style errors (file:line, key path, nearest valid key, accepted values).

Prices are the analytic cost model's (:func:`dynify.cost.price` on unapplied plans): no model
is built beyond the traced original, nothing is trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from dynify import cost
from dynify.cost import parse_budget
from dynify.errors import DynifyError, DynifyTypeError
from dynify.plan import resolve_plan
from dynify.recipe import LayerSettings, Recipe, Rule, Selector
from dynify.search.space import group_layers, load_space
from dynify.trace import trace_model

ROOT = Path(__file__).resolve().parents[1]
HEAD = "version: 1\nmodel: resnet18\ninput_size: [3, 32, 32]\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(DynifyError) as info:
        load_space(path)
    return str(info.value)


# -- bundled spaces ---------------------------------------------------------------------------


def test_bundled_spaces_load_by_name_and_path() -> None:
    default = load_space(None)
    assert (default.model, default.input_size, default.granularity) == (
        "resnet101",
        (3, 32, 32),
        "stage",
    )
    assert default.experts == (1, 2, 4, 8) and 1 in default.experts  # 1 = stay static
    assert default.training.val_images > 0 and default.data == "torch/cifar10"
    assert load_space("default") == default
    assert load_space(ROOT / "search" / "default.yaml").model == "resnet101"
    small = load_space("cifar-small")
    assert (small.model, small.input_size, small.training.epochs) == ("resnet18", (3, 32, 32), 2)
    assert small.label == "cifar-small"


def _all_at(trace, candidates, experts: int, reduction: int):
    names = tuple(lp.name for lp in candidates.converted)
    recipe = Recipe(
        rules=(
            Rule(Selector(), {"convert": False}),
            Rule(
                Selector(name=names), {"convert": True, "experts": experts, "reduction": reduction}
            ),
        )
    )
    return resolve_plan(trace, recipe)


@pytest.mark.parametrize(
    ("space", "budget"),
    [("default", "600MFLOPs"), ("cifar-small", "150MFLOPs")],
)
def test_bundled_budget_is_real(space: str, budget: str) -> None:
    """The static model fits the budget; converting every candidate at the largest K does
    not, even with the cheapest attention (largest reduction) the space offers."""
    s = load_space(space)
    limit = parse_budget(budget)
    model = timm.create_model(s.model, pretrained=False, num_classes=10).eval()
    trace = trace_model(model, input_size=s.input_size)
    static = cost.price(resolve_plan(trace, Recipe(defaults=LayerSettings(convert=False))))
    assert limit.fits(static), f"{s.model} static {static.flops:.3g} FLOPs over {limit}"
    candidates = resolve_plan(trace, s.candidates)
    groups = group_layers(candidates, s.granularity)
    assert len(groups) == 4 and set(groups) == {"stage1", "stage2", "stage3", "stage4"}
    largest = _all_at(trace, candidates, max(s.experts), max(s.reduction))
    assert len(largest.converted) == len(candidates.converted) > 10
    priced = cost.price(largest)
    assert not limit.fits(priced), f"every candidate at K={max(s.experts)} fits {limit}"
    # ... and the space leaves room to choose: the cheapest dynamic option fits.
    smallest_k = min(k for k in s.experts if k > 1)
    assert limit.fits(cost.price(_all_at(trace, candidates, smallest_k, max(s.reduction))))


# -- errors -----------------------------------------------------------------------------------


def test_unknown_keys_name_the_line_and_the_nearest_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, HEAD + "granulatiry: stage\n")
    assert msg.startswith(f"{tmp_path / 'space.yaml'}:4: granulatiry: unknown key")
    assert "did you mean 'granularity'?" in msg

    msg = _error(tmp_path, HEAD + "training:\n  lr: 0.1\n  epoch: 2\n")
    assert ":6: training.epoch: unknown key (did you mean 'epochs'?)" in msg

    msg = _error(tmp_path, HEAD + "choices:\n  expert: [1, 2]\n")
    assert ":5: choices.expert: unknown key (did you mean 'experts'?)" in msg

    # The candidates are a recipe: its errors keep the full path.
    msg = _error(
        tmp_path, HEAD + "candidates:\n  rules:\n    - {select: {stemm: true}, convert: false}\n"
    )
    assert ":6: candidates.rules[0].select.stemm: unknown key (did you mean 'stem'?)" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("choices:\n  experts: [1, two]\n", ":5: choices.experts[1]: expected an integer >= 1"),
        ("choices:\n  experts: [0, 2]\n", "choices.experts[0]: expected an integer >= 1, got 0"),
        ("choices:\n  experts: []\n", "choices.experts: expected a value or a non-empty list"),
        ("choices:\n  experts: [2, 4, 2]\n", "choices.experts[2]: 2 is listed twice"),
        ("choices:\n  attention: [softmx]\n", "got 'softmx' (did you mean 'softmax'?)"),
        ("choices: [1, 2]\n", ":4: choices: expected a mapping with keys"),
        ("granularity: blocks\n", "got 'blocks' (did you mean 'block'?); accepted: layer, block"),
        ("temperature:\n  shape: wobbly\n", ":5: temperature.shape: got 'wobbly'; accepted:"),
        ("temperature:\n  start: 0\n", "temperature.start: expected a number > 0, got 0"),
        ("training:\n  epochs: 0\n", ":5: training.epochs: expected an integer >= 1, got 0"),
        ("training:\n  batch_size: 1.5\n", "training.batch_size: expected an integer >= 1"),
        ("training:\n  lr: -1\n", "training.lr: expected a number > 0, got -1"),
        ("data: [a]\n", ":4: data: expected a string"),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, text: str, expected: str) -> None:
    msg = _error(tmp_path, HEAD + text)
    assert msg.startswith(str(tmp_path / "space.yaml") + ":"), msg
    assert expected in msg, msg


def test_top_level_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _error(tmp_path, "").endswith("the search space is empty")
    assert "missing key 'model'" in _error(tmp_path, "input_size: [3, 32, 32]\n")
    assert "input_size: expected [C, H, W], got [3, 32]" in _error(
        tmp_path, "model: resnet18\ninput_size: [3, 32]\n"
    )
    assert "version: unsupported version 2" in _error(tmp_path, "version: 2\n" + HEAD[11:])
    assert "YAML syntax error" in _error(tmp_path, HEAD + "choices: {experts: [1, 2\n")
    with pytest.raises(DynifyError) as info:
        load_space("defualt")
    assert str(info.value) == (
        "search space 'defualt' is neither a file nor a bundled space (did you mean "
        "'default'?); bundled spaces: cifar-small, default"
    )
    # The lookup recipes share: a non-path is a type error; a name no file can have is no file.
    with pytest.raises(DynifyTypeError) as info:
        load_space(3)  # type: ignore[arg-type]
    assert str(info.value) == (
        "search space must be a path, a bundled space's name or a SearchSpace, got int"
    )
    for name in ("x" * 5000, "a\0b"):
        with pytest.raises(DynifyError, match="neither a file nor a bundled space") as info:
            load_space(name)
        assert len(str(info.value)) < 300
    # A file in the current folder wins over the bundled space of the same name.
    (tmp_path / "default.yaml").write_text(HEAD)
    monkeypatch.chdir(tmp_path)
    assert load_space("default.yaml").model == "resnet18"
    assert load_space("default").model == "resnet101"


def test_a_minimal_space_gets_the_documented_defaults(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, HEAD))
    assert space.data is None and space.granularity == "stage"
    assert space.experts == (1, 2, 4, 8) and space.reduction == (4,)
    assert space.training.epochs == 2 and space.training.val_images == 2000
    assert (space.temperature.start, space.temperature.end) == ((1.0,), (1.0,))  # constant 1
    assert space.label == "space" and space.source == str(tmp_path / "space.yaml")


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; the space reads it as the number it means.
    space = load_space(
        _write(tmp_path, HEAD + "training:\n  lr: 1e-3\ntemperature:\n  start: 3E1\n")
    )
    assert space.training.lr == 0.001 and space.temperature.start == (30.0,)
    assert "training.lr: expected a number > 0, got 'fast'" in _error(
        tmp_path, HEAD + "training:\n  lr: fast\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "version: '" + "9" * 100_000 + "'\nmodel: resnet18\ninput_size: [3, 32, 32]\n",
        "model: resnet18\ninput_size: '" + "3" * 100_000 + "'\n",
    ],
    ids=["version", "input_size"],
)
def test_a_space_error_quotes_a_huge_value_short(tmp_path: Path, text: str) -> None:
    msg = _error(tmp_path, text)
    assert len(msg) < len(str(tmp_path)) + 400, len(msg)
