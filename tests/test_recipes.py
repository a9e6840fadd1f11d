"""Every recipe, every override on a model recipe, and every recipe command the README shows resolves with
``--print_config`` (in process: the command's own parser, without a subprocess per recipe)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from optima.callbacks.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
MODEL_RECIPES = sorted(RECIPES.glob("*.yaml"))
OVERRIDES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent != RECIPES)


def print_config(*args: str) -> dict:
    """The resolved config ``optima ARGS --print_config`` prints (run from the repository root); it must exit 0."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", ["optima"])
        with pytest.raises(SystemExit) as stop:
            main([*args, "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()[-3000:]
    return yaml.safe_load(out.getvalue())


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every non-mapping value of a nested mapping, keyed by its path."""
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found |= leaves(value, (*prefix, key))
        else:
            found[(*prefix, key)] = value
    return found


def at(config: dict, path: tuple[str, ...]) -> object:
    """The value at ``path`` in a nested mapping."""
    for key in path:
        config = config[key]
    return config


def readme_commands(text: str) -> list[str]:
    """The ``optima fit|validate|test --config ...`` commands in the README's code blocks and inline code."""
    code, prose, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            code.append(line.split(" #")[0])
        else:
            prose.append(line)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", "\n".join(prose))]
    found = [re.search(r"optima (?:fit|validate|test) --config .*", c) for c in code + spans]
    return list(dict.fromkeys(m.group(0).strip() for m in found if m))


@pytest.mark.parametrize("recipe", MODEL_RECIPES, ids=lambda p: p.name)
def test_model_recipe_resolves_to_what_it_sets(recipe):
    config = print_config("fit", "--config", str(recipe))
    for path, value in leaves(yaml.safe_load(recipe.read_text())).items():
        assert at(config, path) == value, path


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_override_on_a_model_recipe_wins(override):
    config = print_config("fit", "--config", str(RECIPES / "stories260k.yaml"), "--config", str(override))
    for path, value in leaves(yaml.safe_load(override.read_text())).items():
        assert at(config, path) == value, path


def test_the_readme_shows_recipe_commands():
    assert len(readme_commands((ROOT / "README.md").read_text())) >= 5


@pytest.mark.parametrize("command", readme_commands((ROOT / "README.md").read_text()))
def test_readme_recipe_command_resolves(command):
    args = [a for a in shlex.split(command)[1:] if a != "--print_config"]
    config = print_config(*args)
    for flag in args:
        if flag.startswith("--") and "=" in flag and not flag.startswith("--config"):
            path, value = flag[2:].split("=", 1)
            assert str(at(config, tuple(path.split(".")))) == value, flag
