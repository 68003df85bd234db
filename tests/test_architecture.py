"""The package's shape: imports point one way (no cycles, none hidden in a function), the
public surface resolves, and the plan travels with the model through training wrappers.

See docs/architecture.md for the layers these tests hold the code to.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynify
from dynify._modes import evaluating

PACKAGE = Path(dynify.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported dynify module, line, at module level) for every import in ``module``;
    ``from package import name`` counts as importing ``package.name`` when that is a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = set()
    for node in tree.body:  # module level, including under ``if TYPE_CHECKING`` / ``try``
        top_level.add(node)
        for child in ast.walk(node) if isinstance(node, ast.If | ast.Try) else ():
            top_level.add(child)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "dynify" or target.startswith("dynify."):
                found.append((target, node.lineno, node in top_level))
    return found


def _type_checking_only(module: str, line: int) -> bool:
    """Imports under ``if TYPE_CHECKING:`` never run."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if node.lineno <= line <= (node.end_lineno or node.lineno):
                return True
    return False


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, line, _ in _imports(module):
            if (
                target != module
                and not _type_checking_only(module, line)
                and not _deprecated_alias(module, line)
            ):
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# The top-level package re-exports (lazily) from every layer, and ``__main__`` runs the CLI:
# neither is a layer of its own.
_ENTRY_POINTS = {"dynify", "dynify.__main__"}


def test_no_import_cycles() -> None:
    """Every import between dynify's modules, wherever it is written (a function-local one
    included), points one way: a cycle would mean two modules that each need the other."""
    graph = {m: {t for t in ts if t not in _ENTRY_POINTS} for m, ts in _graph().items()}
    cycle = _cycle({m: ts for m, ts in graph.items() if m not in _ENTRY_POINTS})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_local_imports_of_dynify_outside_the_cli() -> None:
    """A function-local import of a dynify module is how a cycle hides; only the command
    line imports lazily (so that ``--help`` does not import torch), and the package's own
    ``__init__`` and deprecated aliases resolve names on first use."""
    local = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for m in MODULES
        if not m.startswith("dynify.cli") and m not in _ENTRY_POINTS
        for target, line, top in _imports(m)
        if not top and not _deprecated_alias(m, line)
    ]
    assert not local, "\n".join(local)


def _deprecated_alias(module: str, line: int) -> bool:
    """An import inside a module's ``__getattr__`` that serves a deprecated name."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            body = ast.unparse(node)
            if node.lineno <= line <= (node.end_lineno or 0) and "DeprecationWarning" in body:
                return True
    return False


def test_lower_layers_never_import_higher_ones() -> None:
    """The data flow reads top to bottom (docs/architecture.md): a module imports only
    modules of its own layer or below."""
    layers = [
        # foundation
        {"dynify._version", "dynify.errors", "dynify.logging", "dynify._io", "dynify._yaml"},
        {"dynify.layers"},
        {"dynify.schedule", "dynify.trace"},
        {"dynify.recipe"},
        {"dynify.plan"},
        {"dynify.models"},
        {"dynify.cost"},
        {"dynify.convert"},
        {"dynify.fuse"},
        {"dynify.routing"},
        {"dynify.artifact"},
        {"dynify.export"},
        {"dynify.train"},
        {"dynify.fold"},
        {"dynify.search"},
        {"dynify.cli"},
    ]

    def layer_of(module: str) -> int:
        for i, group in enumerate(layers):
            for root in group:
                if module == root or module.startswith(root + "."):
                    return i
        return 0  # the other private helpers (_table, _device, ...) are foundation

    wrong = []
    for module, targets in _graph().items():
        if module in _ENTRY_POINTS:
            continue
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if target in _ENTRY_POINTS:
                continue
            if there > here:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("package", ["cost", "train", "search", "logging", "errors"])
def test_import_dynify_gives_the_subpackages(package: str) -> None:
    """``import dynify`` then ``dynify.cost.count(...)``, as the README writes it, in a
    fresh interpreter (an earlier test's import would hide a missing attribute)."""
    code = f"import dynify, types; assert isinstance(dynify.{package}, types.ModuleType)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert package in dynify.__all__


def test_evaluating_restores_each_modules_own_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model[1].eval()  # a frozen BatchNorm, as fine-tuning recipes do
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("the block failed")
    assert model.training and not model[1].training


def test_the_plan_travels_through_training_wrappers() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    converted = dynify.apply(model, input_size=(3, 32, 32))
    plan = dynify.plan_of(converted)
    assert dynify.plan.find_plan(model) is None  # apply copied; the original is untouched
    wrapped = [torch.nn.DataParallel(converted), torch.compile(converted)]
    for wrapper in wrapped:
        assert dynify.plan_of(wrapper) is plan
        assert dynify.plan.find_plan(wrapper) is plan
    with pytest.raises(dynify.DynifyError, match="already converted"):
        dynify.apply(wrapped[1])
    with pytest.raises(dynify.DynifyError, match="not converted by dynify"):
        dynify.plan_of(torch.nn.DataParallel(model))


def test_a_plan_is_immutable() -> None:
    import dataclasses

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    plan = dynify.make_plan(model, input_size=(3, 32, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.model_name = "other"  # type: ignore[misc]
    assert isinstance(plan.layers, tuple)
    renamed = dataclasses.replace(plan, model_name="other")
    assert renamed.model_name == "other" and plan.model_name == "resnet18"
