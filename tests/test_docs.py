"""What the README and docs/ show runs: every YAML block they contain is loaded the way a
user would load it and converts resnet18, so an example cannot go stale unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import yaml

import dynify

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What marks a search space (docs/search.md) rather than a recipe.
SPACE_KEYS = {"model", "candidates", "choices", "granularity", "training"}


def _yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for number, match in enumerate(re.finditer(r"```ya?ml\n(.*?)```", text, re.S), 1):
            blocks.append((f"{doc.relative_to(ROOT)}#{number}", match.group(1)))
    return blocks


BLOCKS = _yaml_blocks()


def test_the_docs_have_yaml_examples() -> None:
    # The README's recipe and docs/search.md's space, at least: a broken regex passes nothing.
    assert any(name.startswith("README.md") for name, _ in BLOCKS)
    assert any(SPACE_KEYS & set(yaml.safe_load(text)) for _, text in BLOCKS)


@pytest.mark.parametrize(("name", "text"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_yaml_block_loads_and_converts_resnet18(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(text, encoding="utf-8")
    model = timm.create_model("resnet18")
    if SPACE_KEYS & set(yaml.safe_load(text)):
        from dynify.search.space import load_space

        # A space's candidates are a recipe for any model; its own selectors (a classifier
        # rule for conv classifiers) need not all match resnet18, so not strict here.
        recipe = load_space(path).candidates
        converted = dynify.apply(model, recipe, input_size=(3, 32, 32))
    else:
        recipe = dynify.load_recipe(path)
        converted = dynify.apply(model, recipe, input_size=(3, 32, 32), strict=True)
    assert dynify.plan_of(converted).converted, f"{name} converts no conv of resnet18"
