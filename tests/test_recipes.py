"""Every shipped recipe (recursively) validates, opens with its command, and describes itself."""

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.load import load_recipe, read_yaml
from launcher.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
REQUIRED = {"lora", "qlora", "dora", "prompt_tuning", "prefix_tuning", "ia3", "partial_freeze", "full",
            "classify_lora", "classify_head", "distill_classify", "distill_lm"}


def test_all_required_recipes_ship():
    assert REQUIRED <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    name, recipe = load_recipe([f"recipe={path}"])
    preflight(recipe, name)
    assert read_yaml(path).get("description"), "every recipe needs a one-line description"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# Run: tunefleet run recipe={path.stem}"


def test_recipes_command_lists_every_recipe_with_description():
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "recipes"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert {line.split()[0] for line in lines} == {p.stem for p in RECIPES}
    assert all(len(line.split(None, 1)) == 2 for line in lines)
