"""Recipes: selectors, priority, strict mode, validation errors, loading, and plans.

Selectors are tested on hand-made conv sites (no tracing), so each condition is checked
against values written here; a few tests resolve bundled recipes on a real resnet18 trace.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import yaml

import dynify
from dynify._resources import bundled_dir, bundled_names
from dynify.errors import DynifyError, DynifyTypeError
from dynify.plan import Plan, resolve_plan
from dynify.recipe import (
    SELECTOR_KEYS,
    LayerSettings,
    Recipe,
    RecipeBuilder,
    Rule,
    Selector,
    load_recipe,
)
from dynify.schedule import TemperatureSchedule
from dynify.trace import ConvSite, ModelTrace, trace_model

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ("all", "condconv", "dcd", "dycnn", "mobile", "odconv")


def site(name: str, **kw) -> ConvSite:
    base = dict(
        type_name="Conv2d",
        in_channels=16,
        out_channels=32,
        kernel_size=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        bias=False,
        input_shape=(16, 8, 8),
        output_shape=(32, 8, 8),
        calls=1,
        found_by="fx",
    )
    base.update(kw)
    return ConvSite(name=name, **base)


# A small made-up network: stem, two stages of blocks, a conv classifier.
SITES = [
    site("stem.conv", in_channels=3, stride=(2, 2), stem=True, stage=0),
    site("s1.0.pw", kernel_size=(1, 1), padding=(0, 0), stage=1, block="s1.0",
         first_in_block=True),
    site("s1.0.dw", in_channels=32, groups=32, stage=1, block="s1.0"),
    site("s1.0.pwl", in_channels=32, out_channels=24, kernel_size=(1, 1), padding=(0, 0),
         stage=1, block="s1.0", last_in_block=True),
    site("s2.0.conv1", type_name="Conv2dSame", in_channels=24, out_channels=64,
         stride=(2, 2), padding=(0, 0), stage=2, block="s2.0", first_in_block=True),
    site("s2.0.conv2", in_channels=64, out_channels=64, dilation=(2, 2), padding=(2, 2),
         groups=4, stage=2, block="s2.0", last_in_block=True),
    site("s2.0.down", in_channels=24, out_channels=64, kernel_size=(1, 1), padding=(0, 0),
         stride=(2, 2), stage=2, block="s2.0"),
    site("head.fc", in_channels=64, out_channels=10, kernel_size=(1, 1), padding=(0, 0),
         bias=True, classifier=True),
]  # fmt: skip
TRACE = ModelTrace(input_size=(3, 16, 16), sites=SITES, num_stages=3)


def selected(select: dict) -> list[str]:
    recipe = load_recipe({"defaults": {"convert": False}, "rules": [
        {"select": select, "convert": True}]})  # fmt: skip
    return [lp.name for lp in resolve_plan(TRACE, recipe).converted]


# -- selectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ({}, [s.name for s in SITES]),
        ({"name": "s1.*"}, ["s1.0.pw", "s1.0.dw", "s1.0.pwl"]),
        ({"name": ["stem.*", "*.down"]}, ["stem.conv", "s2.0.down"]),
        ({"name": "s1"}, []),  # a glob on the whole path, not a prefix
        ({"regex": r"s\d\.0\.pw.*"}, ["s1.0.pw", "s1.0.pwl"]),
        ({"regex": "pw"}, []),  # full match, not search
        ({"type": "Conv2dSame"}, ["s2.0.conv1"]),
        ({"type": ["Conv2dSame", "StdConv2d"]}, ["s2.0.conv1"]),
        ({"kernel_size": 1}, ["s1.0.pw", "s1.0.pwl", "s2.0.down", "head.fc"]),
        ({"kernel_size": [3]}, ["stem.conv", "s1.0.dw", "s2.0.conv1", "s2.0.conv2"]),
        ({"stride": 2}, ["stem.conv", "s2.0.conv1", "s2.0.down"]),
        ({"dilation": 2}, ["s2.0.conv2"]),
        ({"groups": 4}, ["s2.0.conv2"]),
        ({"groups": [4, 32]}, ["s1.0.dw", "s2.0.conv2"]),
        ({"depthwise": True}, ["s1.0.dw"]),
        ({"depthwise": False, "stage": 1}, ["s1.0.pw", "s1.0.pwl"]),
        ({"in_channels": 24}, ["s2.0.conv1", "s2.0.down"]),
        ({"in_channels": {"min": 30, "max": 64}}, ["s1.0.dw", "s1.0.pwl", "s2.0.conv2",
                                                   "head.fc"]),
        ({"out_channels": {"max": 24}}, ["s1.0.pwl", "head.fc"]),
        ({"out_channels": {"min": 64}}, ["s2.0.conv1", "s2.0.conv2", "s2.0.down"]),
        ({"stem": True}, ["stem.conv"]),
        ({"stage": 2}, ["s2.0.conv1", "s2.0.conv2", "s2.0.down"]),
        ({"stage": -1}, ["s2.0.conv1", "s2.0.conv2", "s2.0.down"]),  # from the last
        ({"stage": [0, -2]}, ["stem.conv", "s1.0.pw", "s1.0.dw", "s1.0.pwl"]),
        ({"block": "s2.*"}, ["s2.0.conv1", "s2.0.conv2", "s2.0.down"]),
        ({"first_in_block": True}, ["s1.0.pw", "s2.0.conv1"]),
        ({"last_in_block": True}, ["s1.0.pwl", "s2.0.conv2"]),
        ({"last_in_block": True, "kernel_size": 1}, ["s1.0.pwl"]),  # conditions AND
        ({"classifier": True}, ["head.fc"]),
        ({"classifier": False, "stem": False, "block": "*"},
         ["s1.0.pw", "s1.0.dw", "s1.0.pwl", "s2.0.conv1", "s2.0.conv2", "s2.0.down"]),
    ],
)  # fmt: skip
def test_selector(select: dict, expected: list[str]) -> None:
    assert selected(select) == expected


def test_non_square_kernel_matches_no_single_size() -> None:
    odd = site("odd", kernel_size=(1, 3))
    assert not Selector(kernel_size=(1,)).matches(odd)
    assert not Selector(kernel_size=(3,)).matches(odd)
    assert Selector(kernel_size=(3,)).matches(site("sq"))


def test_selector_round_trips_through_dict() -> None:
    sel = Selector(name=("a*", "b"), kernel_size=(1,), in_channels=(4, 8), stage=(-1,))
    recipe = Recipe(rules=(Rule(select=sel, settings={"experts": 2}),))
    again = load_recipe(recipe.to_dict())
    assert again.rules[0].select == sel
    assert again.rules[0].settings == {"experts": 2}


# -- priority -----------------------------------------------------------------------------


def _priority_recipe(how: str) -> Recipe:
    if how == "builder":  # the same rules, written as calls
        return (
            RecipeBuilder()
            .set_defaults(experts=4, reduction=4, attention="softmax")
            .set_stage([1, 2], experts=8, reduction=16)
            .set_kernel_size(1, experts=2)
            .set_name("s1.0.pwl", attention="sigmoid", temperature=5)
            .set_stem(True, convert=False)
            .add_rule({"name": "stem.*"}, experts=6)
            .build()
        )
    return load_recipe(
        {
            "defaults": {"experts": 4, "reduction": 4, "attention": "softmax"},
            "rules": [
                {"select": {"stage": [1, 2]}, "experts": 8, "reduction": 16},
                {"select": {"kernel_size": 1}, "experts": 2},
                {"select": {"name": "s1.0.pwl"}, "attention": "sigmoid", "temperature": 5},
                {"select": {"stem": True}, "convert": False},
                {"select": {"name": "stem.*"}, "experts": 6},  # convert stays False
            ],
        }
    )


@pytest.mark.parametrize("how", ["dict", "builder"])
def test_later_rule_overrides_earlier_field_by_field(how: str) -> None:
    plan = resolve_plan(TRACE, _priority_recipe(how))
    s = {lp.name: lp.settings for lp in plan.layers}
    assert (s["s1.0.dw"].experts, s["s1.0.dw"].reduction) == (8, 16)
    assert (s["s1.0.pw"].experts, s["s1.0.pw"].reduction) == (2, 16)  # rule 2 over rule 1
    pwl = s["s1.0.pwl"]
    assert (pwl.experts, pwl.reduction, pwl.attention) == (2, 16, "sigmoid")
    assert pwl.temperature == TemperatureSchedule.constant(5)
    assert s["head.fc"].experts == 2 and s["head.fc"].reduction == 4  # only rule 2
    assert not s["stem.conv"].convert and s["stem.conv"].experts == 6
    # No temperature set: the plan holds the upcycle init's default, explicitly.
    assert s["s2.0.conv2"] == LayerSettings(
        experts=8, reduction=16, temperature=TemperatureSchedule.constant(1.0)
    )
    # The reason names the rule that decided convert (else the defaults).
    assert plan.layer("stem.conv").reason == "rule 4"
    assert plan.layer("s1.0.dw").reason == "defaults"


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ("upcycle", TemperatureSchedule.constant(1.0)),
        ("scratch", TemperatureSchedule(start=30, end=1, length=10)),
        ("perturb", TemperatureSchedule(start=30, end=1, length=10)),
    ],
)
def test_each_init_gets_its_temperature_default(init: str, expected: TemperatureSchedule) -> None:
    plan = resolve_plan(TRACE, load_recipe({"defaults": {"init": init}}))
    assert {lp.settings.temperature for lp in plan.converted} == {expected}
    assert {lp.settings.init for lp in plan.converted} == {init}
    # A rule that switches the init switches the default too; an explicit schedule wins.
    plan = resolve_plan(
        TRACE,
        load_recipe(
            {
                "rules": [
                    {"select": {"stage": 1}, "init": init},
                    {"select": {"name": "s1.0.pw"}, "temperature": 7},
                ]
            }
        ),
    )
    s = {lp.name: lp.settings for lp in plan.layers}
    assert s["s1.0.dw"].temperature == expected
    assert s["s1.0.pw"].temperature == TemperatureSchedule.constant(7)
    assert s["s2.0.conv2"].temperature == TemperatureSchedule.constant(1.0)


def test_noise_outside_the_perturb_init_is_one_clear_error() -> None:
    with pytest.raises(DynifyError, match=r"defaults\.noise: noise 0\.01 applies to init: perturb"):
        load_recipe({"defaults": {"noise": 0.01}})
    with pytest.raises(DynifyError, match=r"rules\[0\]\.noise: .*init: scratch"):
        load_recipe({"rules": [{"select": {"stem": True}, "init": "scratch", "noise": 0.1}]})
    ok = load_recipe({"defaults": {"init": "perturb", "noise": 0.05}})
    assert ok.defaults.noise == 0.05
    assert load_recipe({"defaults": {"noise": 0}}).defaults.noise == 0


def test_last_matching_convert_wins() -> None:
    rules = [
        {"select": {}, "convert": False},
        {"select": {"stage": 2}, "convert": True, "name": "late"},
        {"select": {"name": "s2.0.down"}, "convert": False, "name": "no shortcut"},
    ]
    plan = resolve_plan(TRACE, load_recipe({"rules": rules}))
    assert [lp.name for lp in plan.converted] == ["s2.0.conv1", "s2.0.conv2"]
    assert plan.layer("s2.0.down").reason == "rule 3 (no shortcut)"
    assert plan.layer("s2.0.conv1").reason == "rule 2 (late)"


def test_unsupported_site_is_never_converted() -> None:
    cond = site("cond", type_name="CondConv2d", unsupported="already dynamic (timm CondConv2d)")
    trace = ModelTrace(input_size=(3, 8, 8), sites=[cond])
    plan = resolve_plan(trace, load_recipe("all"))
    assert plan.converted == [] and plan.layer("cond").reason == cond.unsupported
    assert plan.layer("cond").params_after == plan.layer("cond").params_before


# -- strict mode --------------------------------------------------------------------------


def test_strict_fails_on_a_rule_matching_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "rules:\n"
        "  - select: {stem: true}\n"
        "    convert: false\n"
        "  - name: nothing here\n"
        "    select: {kernel_size: 7}\n"
        "    experts: 2\n"
        "strict: true\n"
    )
    with pytest.raises(DynifyError) as err:
        resolve_plan(TRACE, load_recipe(path))
    msg = str(err.value)
    assert f"{path}:4" in msg and "rule 2 (nothing here)" in msg and "kernel_size" in msg
    # strict=False from the caller overrides the recipe; and the reverse.
    assert resolve_plan(TRACE, load_recipe(path), strict=False).layers
    loose = load_recipe({"rules": [{"select": {"kernel_size": 7}, "experts": 2}]})
    assert resolve_plan(TRACE, loose).layers
    with pytest.raises(DynifyError, match=r"inline: rule 1 matches no conv"):
        resolve_plan(TRACE, loose, strict=True)


# -- validation ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(DynifyError) as err:
        load_recipe(write(tmp_path, text))
    return str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "defaults:\n  experts: 4\nrules:\n  - select: {stem: true\n")
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:")
    assert "YAML syntax error" in msg
    line = int(msg.split(":")[1])
    assert line in (4, 5)
    assert "\n" not in msg


def test_unknown_key_names_line_and_nearest_key(tmp_path: Path) -> None:
    text = "defaults:\n  experts: 4\nrules:\n  - select:\n      kernal_size: 1\n    experts: 8\n"
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:5: rules[0].select.kernal_size")
    assert "did you mean 'kernel_size'" in msg
    msg = error_of(tmp_path, "defaults:\n  expert: 4\n")
    assert ":2: defaults.expert" in msg and "did you mean 'experts'" in msg
    msg = error_of(tmp_path, "defualts: {}\n")
    assert ":1: defualts" in msg and "did you mean 'defaults'" in msg
    msg = error_of(tmp_path, "rules:\n  - select: {}\n    convert: true\n    temprature: 3\n")
    assert ":4: rules[0].temprature" in msg and "did you mean 'temperature'" in msg


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("defaults:\n  experts: 0\n", ":2: defaults.experts", "integer >= 1, got 0"),
        ("defaults:\n  experts: four\n", ":2: defaults.experts", "got 'four'"),
        ("defaults:\n  experts: 2.5\n", ":2: defaults.experts", "integer"),
        ("defaults:\n  reduction: true\n", ":2: defaults.reduction", "integer"),
        ("defaults:\n  attention: softmaxx\n", ":2: defaults.attention",
         "did you mean 'softmax'"),
        ("defaults:\n  noise: -1\n", ":2: defaults.noise", ">= 0"),
        ("defaults:\n  init: upcycled\n", ":2: defaults.init", "did you mean 'upcycle'"),
        ("defaults:\n  init: perturb\n  noise: 0.1\nrules:\n  - {init: scratch, noise: 0.2}\n",
         ":5: rules[0].noise", "init: scratch"),
        ("defaults:\n  routing_std: -1\n", ":2: defaults.routing_std", ">= 0"),
        ("defaults:\n  temperature: {shape: cosin}\n", "defaults.temperature.shape",
         "did you mean 'cosine'"),
        ("defaults:\n  temperature: {start: 0}\n", "defaults.temperature.start", "> 0"),
        ("defaults:\n  temperature: -3\n", "defaults.temperature", "> 0"),
        ("defaults:\n  temperature: {unit: epochs}\n", "defaults.temperature.unit",
         "did you mean 'epoch'"),
        ("defaults:\n  convert: yes please\n", "defaults.convert", "true or false"),
        ("rules:\n  - select: {in_channels: {min: 64, max: 32}}\n    experts: 2\n",
         ":2: rules[0].select.in_channels", "empty range: min 64 > max 32"),
        ("rules:\n  - select: {out_channels: 0}\n    experts: 2\n",
         "rules[0].select.out_channels", ">= 1"),
        ("rules:\n  - select: {kernel_size: []}\n    experts: 2\n",
         "rules[0].select.kernel_size", "non-empty list"),
        ("rules:\n  - select: {type: conv2d}\n    experts: 2\n", "rules[0].select.type",
         "did you mean 'Conv2d'"),
        ("rules:\n  - select: {regex: 'a('}\n    experts: 2\n", "rules[0].select.regex",
         "invalid regular expression"),
        ("rules:\n  - select: {stem: 1}\n    experts: 2\n", "rules[0].select.stem",
         "true or false"),
        ("rules:\n  - select: {stem: true}\n", ":2: rules[0]", "must set at least one"),
        ("rules:\n  - select: stem\n    experts: 2\n", "rules[0].select", "expected a mapping"),
        ("rules: {select: {}}\n", "rules", "expected a list"),
        ("version: 2\n", ":1: version", "unsupported recipe version"),
        ("strict: maybe\n", "strict", "true or false"),
        ("- 1\n- 2\n", "recipe.yaml", "expected a mapping"),
        ("", "recipe.yaml:1", "the recipe is empty"),
        ("defaults: {experts: 2}\ndefaults: {experts: 3}\n", ":2: defaults", "duplicate key"),
    ],
)  # fmt: skip
def test_validation_errors(tmp_path: Path, text: str, where: str, what: str) -> None:
    msg = error_of(tmp_path, text)
    assert where in msg and what in msg
    assert msg.startswith(str(tmp_path / "recipe.yaml"))
    assert "\n" not in msg


def test_dict_recipe_errors_name_the_key_path() -> None:
    with pytest.raises(DynifyError, match=r"defaults\.experts: expected an integer >= 1"):
        load_recipe({"defaults": {"experts": -2}})
    with pytest.raises(DynifyError, match=r"did you mean 'kernel_size'"):
        load_recipe({"rules": [{"select": {"kernelsize": 3}, "experts": 2}]})


# -- loading ------------------------------------------------------------------------------


def test_load_by_bundled_name_path_dict_and_recipe(tmp_path: Path) -> None:
    by_name = load_recipe("mobile")
    assert by_name.source is not None and Path(by_name.source).name == "mobile.yaml"
    assert load_recipe("mobile.yaml") == by_name
    by_path = load_recipe(ROOT / "recipes" / "mobile.yaml")
    assert by_path.rules == by_name.rules and by_path.defaults == by_name.defaults
    assert load_recipe(str(ROOT / "recipes" / "mobile.yaml")).rules == by_name.rules
    as_dict = yaml.safe_load((ROOT / "recipes" / "mobile.yaml").read_text())
    from_dict = load_recipe(as_dict)
    assert from_dict.defaults == by_name.defaults
    assert [r.select for r in from_dict.rules] == [r.select for r in by_name.rules]
    assert from_dict.label == "inline" and by_name.label == "mobile"
    assert load_recipe(by_name) is by_name
    assert load_recipe(None).label == "dycnn"
    # A file in the current folder wins over a bundled recipe of the same name.
    local = tmp_path / "mobile.yaml"
    local.write_text("defaults: {experts: 7}\n")
    assert load_recipe(local).defaults.experts == 7


def test_unknown_bundled_name_lists_the_bundled_recipes() -> None:
    with pytest.raises(DynifyError) as err:
        load_recipe("mobil")
    msg = str(err.value)
    assert "neither a file nor a bundled recipe" in msg and "did you mean 'mobile'" in msg
    assert "bundled recipes: all, condconv, dcd, dycnn, dycnn-scratch, mobile, odconv" in msg
    with pytest.raises(DynifyError, match="neither a file nor a bundled recipe"):
        load_recipe("some/dir/missing.yaml")
    with pytest.raises(DynifyTypeError, match="a dict or a Recipe, got int"):
        load_recipe(3)  # type: ignore[arg-type]
    # A name no file can have is "not a file", not the OS's error.
    for name in ("x" * 5000, "a\0b"):
        with pytest.raises(DynifyError, match="neither a file nor a bundled recipe") as err:
            load_recipe(name)
        assert len(str(err.value)) < 300


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_loads_and_has_a_comment_header(name: str) -> None:
    assert set(BUNDLED) <= set(bundled_names("recipes"))
    path = bundled_dir("recipes") / f"{name}.yaml"
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header and header[0].startswith(f"# {name}:")
    assert len(" ".join(header)) > 80  # says what it is for, not just a title
    recipe = load_recipe(name)
    assert recipe.description
    assert load_recipe(recipe.to_dict()).rules == tuple(
        Rule(select=r.select, settings=r.settings, name=r.name) for r in recipe.rules
    )
    # Equality leaves out where a recipe was read from (its source, its rules' lines) only.
    again = load_recipe(recipe.to_dict())
    assert again == recipe and again.source is None and recipe.source is not None
    assert all(r.line for r in recipe.rules) and not any(r.line for r in again.rules)
    more = replace(recipe.defaults, experts=recipe.defaults.experts + 1)
    assert replace(recipe, defaults=more) != recipe
    assert replace(recipe, description="other") != recipe


# -- bundled recipes on a real model ------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_trace() -> ModelTrace:
    return trace_model(timm.create_model("resnet18").eval(), input_size=(3, 64, 64))


def test_bundled_recipes_on_resnet18(resnet18_trace: ModelTrace) -> None:
    names = [s.name for s in resnet18_trace]
    dycnn = resolve_plan(resnet18_trace, load_recipe("dycnn"))
    assert [lp.name for lp in dycnn.converted] == names[1:]  # all but conv1
    first = dycnn.converted[0].settings
    assert (first.experts, first.reduction, first.attention) == (4, 4, "softmax")
    assert first.init == "upcycle" and first.temperature == TemperatureSchedule.constant(1)
    scratch = resolve_plan(resnet18_trace, load_recipe("dycnn-scratch"))
    assert [lp.name for lp in scratch.converted] == names[1:]
    assert {(lp.settings.init, lp.settings.temperature) for lp in scratch.converted} == {
        ("scratch", TemperatureSchedule(30, 1, 10, "linear", "epoch"))
    }

    mobile = resolve_plan(resnet18_trace, load_recipe("mobile"))
    assert [lp.name for lp in mobile.converted] == [
        f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)
    ]
    everything = resolve_plan(resnet18_trace, load_recipe("all"))
    assert len(everything.converted) == len(names) == 20

    cc = resolve_plan(resnet18_trace, load_recipe("condconv"))
    assert [lp.name for lp in cc.converted] == [
        n for n in names if n.startswith(("layer3.", "layer4."))
    ]
    assert {(lp.settings.experts, lp.settings.attention) for lp in cc.converted} == {(8, "sigmoid")}


# -- plans --------------------------------------------------------------------------------


def test_plan_to_recipe_reproduces_the_plan(resnet18_trace: ModelTrace, tmp_path: Path) -> None:
    recipe = load_recipe(
        {
            "rules": [
                {"select": {"stem": True}, "convert": False},
                {"select": {"stage": -1}, "experts": 6, "attention": "sigmoid"},
                {"select": {"name": "layer2.*"}, "temperature": {"start": 10, "shape": "cosine"}},
                {"select": {"kernel_size": 1}, "convert": False},
            ]
        }
    )
    plan = resolve_plan(resnet18_trace, recipe)
    again = resolve_plan(resnet18_trace, plan.to_recipe())
    assert [lp.settings for lp in again.converted] == [lp.settings for lp in plan.converted]
    assert [lp.name for lp in again.converted] == [lp.name for lp in plan.converted]
    # ...also through YAML text, as a user would keep it.
    path = tmp_path / "frozen.yaml"
    path.write_text(plan.to_recipe(description="frozen").to_yaml(header="frozen plan"))
    assert path.read_text().startswith("# frozen plan\n")
    from_file = resolve_plan(resnet18_trace, load_recipe(path))
    assert [(lp.name, lp.settings) for lp in from_file.converted] == [
        (lp.name, lp.settings) for lp in plan.converted
    ]


def test_plan_round_trips_through_dict(resnet18_trace: ModelTrace) -> None:
    plan = resolve_plan(resnet18_trace, load_recipe("mobile"))
    again = Plan.from_dict(plan.to_dict())
    assert again.layers == plan.layers
    assert again.input_size == plan.input_size and again.recipe == "mobile"


def test_plan_table_and_parameter_counts(resnet18_trace: ModelTrace) -> None:
    plan = resolve_plan(resnet18_trace, load_recipe("dycnn"))
    lp = plan.layer("layer1.0.conv1")  # 64->64 3x3, no bias; attention 64->16->4
    assert lp.params_before == 64 * 64 * 9
    assert lp.params_after == 4 * 64 * 64 * 9 + (64 * 16 + 16) + (16 * 4 + 4)
    assert plan.layer("conv1").params_after == plan.layer("conv1").params_before
    table = plan.table()
    assert "layer1.0.conv1" in table and "19/20 dynamic" in table
    assert f"{plan.params_before:,}" in table and f"{plan.params_after:,}" in table
    first_cells = [r.split()[0] for r in table.splitlines()[2:] if not r.startswith("-")]
    assert first_cells[:2] == ["conv1", "layer1.0.conv1"] and first_cells[-1] == "total"
    only = plan.table(only_converted=True).splitlines()[2:]
    only = [r.split()[0] for r in only if not r.startswith("-")]
    assert "conv1" not in only and len(only) == 19 + 1


def test_make_plan_matches_apply(resnet18_trace: ModelTrace) -> None:
    model = timm.create_model("resnet18").eval()
    plan = dynify.make_plan(model, "mobile", input_size=(3, 64, 64))
    assert plan.model_name == "resnet18"
    converted = dynify.apply(model, "mobile", input_size=(3, 64, 64))
    assert [lp.name for lp in dynify.plan_of(converted).converted] == [
        lp.name for lp in plan.converted
    ]


def test_recipe_round_trip_keeps_init_defaults_implicit() -> None:
    recipe = load_recipe({"rules": [{"select": {"stage": 1}, "init": "scratch"}]})
    again = load_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict() and "temperature" not in recipe.to_dict()["defaults"]
    plan = resolve_plan(TRACE, again)
    s = {lp.name: lp.settings for lp in plan.layers}
    assert s["s1.0.dw"].temperature == TemperatureSchedule(start=30, end=1, length=10)
    assert s["s2.0.conv2"].temperature == TemperatureSchedule.constant(1.0)


# -- hostile YAML: aliases that never end or expand without bound ------------------------


def _billion_laughs(levels: int) -> str:
    text = "a0: &a0 [" + ", ".join(["x"] * 10) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "an alias that contains itself"),
        ("defaults: &d {experts: *d}\n", "an alias that contains itself"),
        (_billion_laughs(20), "more than 100,000 values once its aliases are expanded"),
    ],
    ids=["list", "mapping", "billion-laughs"],
)
def test_hostile_aliases_are_one_line_at_once(tmp_path: Path, text: str, message: str) -> None:
    import time

    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(DynifyError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # The old reader recursed without end or expanded 10**20 values: generous bound.
    assert time.perf_counter() - start < 30


def test_an_alias_used_twice_is_still_plain_yaml(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "version: 1\n"
        "defaults: {experts: 4}\n"
        "rules:\n"
        "  - select: &deep {name: 'layer4.*'}\n"
        "    experts: 8\n"
        "  - select: *deep\n"
        "    reduction: 8\n"
    )
    recipe = load_recipe(path)
    assert [r.select for r in recipe.rules] == [Selector(name=("layer4.*",))] * 2


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\ndefaults: {experts: '" + "9" * 1_000_000 + "'}\n",
        "version: 1\ndefaults: {" + "k" * 1_000_000 + ": 4}\n",
        "version: 1\ndefaults: {experts: [" + "1, " * 100_000 + "1]}\n",
        "version: '" + "9" * 100_000 + "'\n",
        "rules: '" + "r" * 100_000 + "'\n",
        "rules:\n  - {select: {regex: '(" + "a" * 100_000 + "'}, experts: 2}\n",
    ],
    ids=["huge-value", "huge-key", "long-list", "version", "rules", "regex"],
)
def test_a_recipe_error_quotes_huge_values_short(tmp_path: Path, text: str) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(DynifyError) as err:
        load_recipe(path)
    assert len(str(err.value)) < len(str(path)) + 400, len(str(err.value))


# -- building a recipe in Python ---------------------------------------------------------

# The selector keys the format documents (module docstring, README): one builder method each.
DOCUMENTED_SELECTORS = (
    "name regex type kernel_size stride dilation groups depthwise in_channels out_channels "
    "stem stage block first_in_block last_in_block classifier"
).split()


def test_the_builder_has_one_method_per_selector_key() -> None:
    assert set(SELECTOR_KEYS) == set(DOCUMENTED_SELECTORS)
    methods = {n for n in vars(RecipeBuilder) if n.startswith("set_")}
    assert methods == {f"set_{key}" for key in DOCUMENTED_SELECTORS} | {"set_defaults"}
    assert RecipeBuilder.set_block.__name__ == "set_block"
    assert "block" in (RecipeBuilder.set_block.__doc__ or "")
    assert isinstance(Recipe.builder(), RecipeBuilder)


CHOSEN_YAML = """\
version: 1
description: hand-written
defaults: {experts: 4, reduction: 4, attention: softmax}
rules:
  - {name: stem stays static, select: {stem: true}, convert: false}
  - {select: {stage: [-2, -1]}, experts: 8, temperature: {start: 5, shape: cosine}}
  - {select: {kernel_size: 1}, reduction: 8, attention: sigmoid}
  - {select: {in_channels: {min: 256}, first_in_block: true}, init: scratch}
  - {select: {name: "layer4.1.*"}, convert: false}
  - {select: {regex: 'layer1\\.0\\.conv\\d'}, experts: 2, routing_std: 0.5}
strict: true
"""


def _chosen_builder() -> Recipe:
    return (
        Recipe.builder(description="hand-written", strict=True)
        .set_defaults(experts=4, reduction=4, attention="softmax")
        .set_stem(True, convert=False, name="stem stays static")
        .set_stage((-2, -1), experts=8, temperature={"start": 5, "shape": "cosine"})
        .set_kernel_size(1, reduction=8, attention="sigmoid")
        .add_rule({"in_channels": {"min": 256}, "first_in_block": True}, init="scratch")
        .set_name("layer4.1.*", convert=False)
        .set_regex(r"layer1\.0\.conv\d", experts=2, routing_std=0.5)
        .build()
    )


@pytest.fixture(scope="module")
def resnet18_random():
    return timm.create_model("resnet18", pretrained=False).eval()


def test_the_builder_and_the_yaml_give_the_same_plan(resnet18_random, tmp_path: Path) -> None:
    from_yaml = load_recipe(write(tmp_path, CHOSEN_YAML))
    built = _chosen_builder()
    assert built == from_yaml and built.source is None
    plans = [
        dynify.make_plan(resnet18_random, r, input_size=(3, 32, 32)) for r in (from_yaml, built)
    ]
    rows = [[(lp.name, lp.settings, lp.reason) for lp in p.layers] for p in plans]
    assert rows[0] == rows[1] and len(rows[0]) == 20
    # ...and that plan is what the rules say (written out here, not derived from either).
    s = {lp.name: lp.settings for lp in plans[1].layers}
    assert not s["conv1"].convert and not s["layer4.1.conv1"].convert
    assert (s["layer1.0.conv1"].experts, s["layer1.0.conv1"].routing_std) == (2, 0.5)
    assert (s["layer2.0.conv1"].experts, s["layer2.0.conv1"].init) == (4, "upcycle")
    deep = s["layer3.0.downsample.0"]  # stage -2, 1x1, 128 in: not first_in_block's 256
    assert (deep.experts, deep.reduction, deep.attention) == (8, 8, "sigmoid")
    assert deep.temperature == TemperatureSchedule(start=5, shape="cosine")
    assert (s["layer4.0.conv1"].init, s["layer4.0.conv1"].experts) == ("scratch", 8)
    assert s["layer2.0.conv1"].attention == "softmax" and s["layer4.0.conv2"].init == "upcycle"
    # dynify.apply takes the built recipe as it takes the file.
    converted = dynify.apply(timm.create_model("resnet18"), built, input_size=(3, 32, 32))
    assert [lp.name for lp in dynify.plan_of(converted).converted] == [
        lp.name for lp in plans[0].converted
    ]


def test_the_builder_applies_rules_in_the_order_they_were_added() -> None:
    def experts(builder: RecipeBuilder) -> dict[str, int]:
        return {lp.name: lp.settings.experts for lp in resolve_plan(TRACE, builder.build()).layers}

    stage_last = experts(RecipeBuilder().set_kernel_size(1, experts=2).set_stage(1, experts=8))
    kernel_last = experts(RecipeBuilder().set_stage(1, experts=8).set_kernel_size(1, experts=2))
    assert (stage_last["s1.0.pw"], kernel_last["s1.0.pw"]) == (8, 2)  # in both: the later
    assert stage_last["s1.0.dw"] == kernel_last["s1.0.dw"] == 8  # only the stage rule
    assert stage_last["head.fc"] == kernel_last["head.fc"] == 2  # only the kernel rule
    assert stage_last["s2.0.conv2"] == 4  # neither: the defaults
    # set_defaults again updates the fields it names, the others stay.
    twice = RecipeBuilder().set_defaults(experts=6, reduction=2).set_defaults(experts=3).build()
    assert (twice.defaults.experts, twice.defaults.reduction) == (3, 2)


def test_the_builder_round_trips_through_yaml_and_dict(tmp_path: Path) -> None:
    built = _chosen_builder()
    path = tmp_path / "built.yaml"
    path.write_text(built.to_yaml(header="written by the builder"))
    again = load_recipe(path)
    assert again == built and load_recipe(built.to_dict()) == built
    assert again.strict and again.description == "hand-written"
    assert (
        resolve_plan(TRACE, again, strict=False).layers
        == resolve_plan(TRACE, built, strict=False).layers
    )
    # The builder's own dict is the YAML's structure, and loads to the same recipe.
    builder = RecipeBuilder().set_stage(-1, experts=8)
    assert builder.to_dict()["rules"] == [{"select": {"stage": -1}, "experts": 8}]
    assert load_recipe(builder.to_dict()) == builder.build()


def test_the_builder_takes_python_spellings_and_copies_what_it_is_given() -> None:
    as_tuple = RecipeBuilder().set_stage((1, 2), experts=8).build()
    as_list = RecipeBuilder().set_stage([1, 2], experts=8).build()
    assert as_tuple == as_list and as_tuple.rules[0].select.stage == (1, 2)
    by_selector = RecipeBuilder().add_rule(Selector(kernel_size=(1,), stage=(-1,)), experts=2)
    by_dict = RecipeBuilder().add_rule({"kernel_size": 1, "stage": -1}, experts=2)
    assert by_selector.build() == by_dict.build()
    schedule = TemperatureSchedule(start=10, end=1, length=3)
    timed = RecipeBuilder().set_defaults(temperature=schedule)
    assert timed.build().defaults.temperature == schedule
    assert yaml.safe_load(yaml.safe_dump(timed.to_dict())) == timed.to_dict()  # plain data
    select = {"name": ["s1.*"]}
    builder = RecipeBuilder().add_rule(select, experts=2)
    select["name"].append("zzz")  # a later change to the caller's dict changes nothing
    assert builder.build().rules[0].select == Selector(name=("s1.*",))
    # Starting from a recipe: its rules first, the added ones after (so they win).
    mobile = load_recipe("mobile")
    assert RecipeBuilder.from_recipe("mobile").build() == mobile
    more = RecipeBuilder.from_recipe(mobile).set_stage(-1, experts=8).build()
    assert more.rules[:-1] == mobile.rules and more.rules[-1].settings == {"experts": 8}


# The same mistake in a file and in a call: (YAML text, the call, what the message says).
MISTAKES = [
    ("defaults:\n  expert: 4\n", lambda b: b.set_defaults(expert=4), "did you mean 'experts'"),
    ("defaults:\n  experts: 0\n", lambda b: b.set_defaults(experts=0), "integer >= 1, got 0"),
    ("defaults:\n  attention: softmaxx\n", lambda b: b.set_defaults(attention="softmaxx"),
     "did you mean 'softmax'"),
    ("defaults:\n  noise: 0.1\n", lambda b: b.set_defaults(noise=0.1),
     "noise 0.1 applies to init: perturb only"),
    ("defaults:\n  temperature: {shape: cosin}\n",
     lambda b: b.set_defaults(temperature={"shape": "cosin"}), "did you mean 'cosine'"),
    ("rules:\n  - select: {kernal_size: 1}\n    experts: 8\n",
     lambda b: b.add_rule({"kernal_size": 1}, experts=8), "did you mean 'kernel_size'"),
    ("rules:\n  - select: {kernel_size: 1}\n    temprature: 3\n",
     lambda b: b.set_kernel_size(1, temprature=3), "did you mean 'temperature'"),
    ("rules:\n  - select: {stage: [1, x]}\n    experts: 2\n",
     lambda b: b.set_stage((1, "x"), experts=2), "stage[1]: expected an integer, got 'x'"),
    ("rules:\n  - select: {type: conv2d}\n    experts: 2\n",
     lambda b: b.set_type("conv2d", experts=2), "did you mean 'Conv2d'"),
    ("rules:\n  - select: {in_channels: {min: 64, max: 32}}\n    experts: 2\n",
     lambda b: b.set_in_channels({"min": 64, "max": 32}, experts=2), "empty range"),
    ("rules:\n  - select: {out_channels: {low: 3}}\n    experts: 2\n",
     lambda b: b.set_out_channels({"low": 3}, experts=2), "accepted keys: min, max"),
    ("rules:\n  - select: {regex: 'a('}\n    experts: 2\n",
     lambda b: b.set_regex("a(", experts=2), "invalid regular expression"),
    ("rules:\n  - select: {stem: 1}\n    experts: 2\n", lambda b: b.set_stem(1, experts=2),
     "true or false"),
    ("rules:\n  - select: {kernel_size: []}\n    experts: 2\n",
     lambda b: b.set_kernel_size([], experts=2), "non-empty list"),
    ("rules:\n  - select: {stem: true}\n", lambda b: b.set_stem(True), "must set at least one"),
    ("rules:\n  - {select: {stem: true}, init: scratch, noise: 0.1}\n",
     lambda b: b.set_stem(True, init="scratch", noise=0.1), "init: scratch"),
    ("rules:\n  - {name: 3, experts: 2}\n", lambda b: b.add_rule(name=3, experts=2),
     "expected a string"),
    ("rules:\n  - {select: stem, experts: 2}\n", lambda b: b.add_rule("stem", experts=2),
     "expected a mapping"),
    ("strict: maybe\n", lambda b: RecipeBuilder(strict="maybe"), "true or false"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "call", "what"), MISTAKES)
def test_a_builder_mistake_is_the_files_one_line_error(
    tmp_path: Path, text: str, call, what: str
) -> None:
    in_file = error_of(tmp_path, text)
    builder = RecipeBuilder().set_defaults(experts=4)
    before = builder.to_dict()
    with pytest.raises(DynifyError) as err:
        call(builder)
    in_call = str(err.value)
    assert what in in_file and "\n" not in in_call
    assert in_call.startswith("<RecipeBuilder>: ")
    # The same message once the location is off: the file's "path:line: ", the builder's name.
    path = re.escape(str(tmp_path / "recipe.yaml"))
    assert in_call.removeprefix("<RecipeBuilder>: ") == re.sub(rf"^{path}(:\d+)?: ", "", in_file)
    assert builder.to_dict() == before  # the failed call changed nothing


def test_noise_that_resolves_onto_another_init_names_the_conv() -> None:
    recipe = RecipeBuilder().set_stage(1, noise=0.1).build()  # the defaults' init: upcycle
    with pytest.raises(DynifyError) as err:
        resolve_plan(TRACE, recipe)
    assert str(err.value) == (
        "recipe: s1.0.pw: noise 0.1 applies to init: perturb only, and this conv resolves to "
        "init: upcycle; remove the noise, or set init: perturb with it"
    )
    assert resolve_plan(TRACE, RecipeBuilder().set_stage(1, noise=0.1, init="perturb").build())


def test_the_readmes_builder_example_is_its_yaml_example() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Recipes") :]
    section = section[: section.index("\n## ", 1)]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S)
    python_block = re.search(r"```python\n(.*?)```", section, re.S)
    assert yaml_block and python_block and "Recipe.builder(" in python_block.group(1)
    # Run the example up to the recipe (converting resnet50 is test_docs' kind of check).
    code = python_block.group(1).split("\nmodel = ")[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["recipe"] == load_recipe(yaml.safe_load(yaml_block.group(1)))


# -- kinds ----------------------------------------------------------------------------------


def test_attention_reads_as_kind_with_a_deprecation_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="dynify"):
        recipe = load_recipe(
            {
                "defaults": {"attention": "sigmoid"},
                "rules": [{"select": {"stage": 1}, "attention": "softmax"}],
            }
        )
    assert recipe.defaults.kind == "condconv" and recipe.defaults.attention == "sigmoid"
    assert recipe.rules[0].settings == {"kind": "dycnn"}
    said = [r.getMessage() for r in caplog.records]
    assert any("'attention: sigmoid' is deprecated; write 'kind: condconv'" in m for m in said)
    assert any("'attention: softmax' is deprecated; write 'kind: dycnn'" in m for m in said)
    plan = resolve_plan(TRACE, recipe)
    assert plan.layer("s1.0.pw").settings.kind == "dycnn"
    assert plan.layer("head.fc").settings.kind == "condconv"
    # Written back, the recipe says kind, never attention.
    assert "attention" not in yaml.safe_dump(recipe.to_dict())


def test_a_plan_written_with_attention_reads_without_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="dynify"):
        settings = LayerSettings.from_dict({"experts": 4, "attention": "sigmoid"})
    assert settings.kind == "condconv" and not caplog.records


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"kind": "odconvv"}, r"defaults\.kind: .*'odconvv'"),
        ({"kind": "dycnn", "attention": "sigmoid"}, "attention: sigmoid means kind: condconv"),
        ({"kind": "dycnn", "rank": 8}, r"defaults\.rank: rank applies to kind: dcd"),
        ({"rank": 0}, r"defaults\.rank: expected an integer >= 1"),
    ],
)
def test_kind_fields_are_checked_like_the_others(defaults, message) -> None:
    with pytest.raises(DynifyError, match=message):
        load_recipe({"defaults": defaults})


def test_a_rule_that_switches_kind_keeps_the_fields_that_kind_uses() -> None:
    recipe = load_recipe(
        {"defaults": {"experts": 4}, "rules": [{"select": {"stage": 1}, "kind": "condconv"}]}
    )
    plan = resolve_plan(TRACE, recipe)
    pw = plan.layer("s1.0.pw").settings
    assert (pw.kind, pw.experts, pw.rank) == ("condconv", 4, None)
    assert plan.layer("head.fc").settings.kind == "dycnn"


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"kind": "dcd", "experts": 4}, r"defaults\.experts: experts applies to kind: dycnn, "
         r"condconv, odconv, not dcd"),
        ({"kind": "odconv", "rank": 4}, r"defaults\.rank: rank applies to kind: dcd, not odconv"),
        ({"kind": "dcd", "init": "scratch"}, r"defaults\.init: kind: dcd starts from init: "
         r"upcycle, got scratch"),
        ({"kind": "odconv", "noise": 0.1, "init": "perturb"}, r"noise applies to kind"),
        ({"kind": "dcd", "routing_std": 0.5}, r"routing_std applies to kind"),
    ],
)  # fmt: skip
def test_a_field_beside_a_kind_that_has_no_use_for_it_is_one_line(defaults, message) -> None:
    with pytest.raises(DynifyError, match=message):
        load_recipe({"defaults": defaults})
    with pytest.raises(DynifyError, match=message.replace(r"defaults\.", "")):
        RecipeBuilder().set_defaults(**defaults)


def test_a_kind_leaves_the_convs_it_does_not_cover_static_with_the_reason() -> None:
    plan = resolve_plan(TRACE, {"defaults": {"kind": "dcd"}})
    dw = plan.layer("s1.0.dw")  # depthwise
    assert not dw.convert and dw.reason.startswith("kind dcd: ") and "depthwise" in dw.reason
    grouped = plan.layer("s2.0.conv2")
    assert not grouped.convert and "group" in grouped.reason
    same = plan.layer("s2.0.conv1")  # timm's run-time TF-'SAME' padding
    assert not same.convert and same.reason.startswith("kind dcd: ")
    assert plan.layer("s1.0.pw").convert and plan.layer("s1.0.pw").settings.experts == 1
    odconv = resolve_plan(TRACE, {"defaults": {"kind": "odconv"}})
    assert odconv.layer("s1.0.dw").convert and odconv.layer("s2.0.conv2").convert
    assert not odconv.layer("s2.0.conv1").convert
    assert odconv.layer("s2.0.conv1").reason.startswith("kind odconv: ")
    # The file form keeps the reason: a plan read back leaves the same convs static.
    again = Plan.from_dict(plan.to_dict())
    assert [lp.convert for lp in again.layers] == [lp.convert for lp in plan.layers]


def test_the_bundled_kind_recipes_convert_resnet18_exactly() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for name in ("odconv", "dcd", "condconv"):
        converted = dynify.apply(model, name, input_size=(3, 32, 32))
        plan = dynify.plan_of(converted)
        assert {lp.settings.kind for lp in plan.converted} == {name}
        assert plan.check_error is not None and plan.check_error < 1e-4
