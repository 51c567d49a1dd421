"""From command-line words to a validated `Recipe`.

    recipe=lora train.lr=2e-4 data.train=my.jsonl

`recipe=` names `recipes/NAME.yaml` or a YAML file; every other word is `key.sub=value`, split on
the first `=`. Values are read as YAML scalars or lists and then coerced to the field's type by the
schema; all problems are collected into one `UserError` whose lines name the key and say how to fix it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.config.assets import named_yaml_files, search_path
from launcher.config.schema import METHOD_NAMES, Recipe
from launcher.errors import UserError



def available_recipes() -> dict[str, Path]:
    """Every recipe on the search path (launcher.config.assets): a user's folders, then the shipped ones."""
    return named_yaml_files("recipes")


def find_recipe(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if path.is_dir():
            raise UserError(f"recipe={name}: {path} is a folder, but a recipe YAML file is expected here")
        if not path.is_file():
            raise UserError(f"recipe file {name} does not exist")
        if not os.access(path, os.R_OK):
            raise UserError(f"recipe={name}: {path} cannot be read (permission denied)")
        return path
    recipes = available_recipes()
    if name in recipes:
        return recipes[name]
    close = difflib.get_close_matches(name, recipes, n=1)
    hint = f" Did you mean recipe={close[0]}?" if close else ""
    if not recipes:
        folders = ", ".join(str(p) for p in search_path("recipes"))
        raise UserError(f"no recipe named '{name}': no recipes found (searched {folders}); "
                        "reinstall tunefleet or give recipe=path/to/file.yaml")
    raise UserError(f"no recipe named '{name}'.{hint} Available: {', '.join(recipes)} (or recipe=path/to/file.yaml)")


def split_overrides(words: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Return the recipe name and the (key, raw value) overrides, rejecting malformed words."""
    recipe_name = None
    overrides: list[tuple[str, str]] = []
    for word in words:
        if word.startswith("-"):
            raise UserError(f"'{word}': options are written key=value, without dashes (e.g. train.lr=2e-4)")
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UserError(f"'{word}' is not key=value (e.g. recipe=lora or train.max_steps=100)")
        if key == "recipe":
            recipe_name = value
        else:
            overrides.append((key, value))
    if not recipe_name:
        raise UserError(f"no recipe given: add recipe=NAME. Available: {', '.join(available_recipes())}")
    return recipe_name, overrides


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"recipe file {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of sections (model, peft, data, ...)")
    return data


def parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise UserError(f"cannot set {key}: {part} is not a section")
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_recipe(words: list[str]) -> tuple[str, Recipe]:
    """Resolve `recipe=...` plus overrides into a validated recipe; return (recipe name, recipe)."""
    recipe_name, overrides = split_overrides(words)
    path = find_recipe(recipe_name)
    tree = read_yaml(path)
    _switch_method(tree, dict(overrides).get("peft.method"))
    for key, raw in overrides:
        set_path(tree, key, parse_value(raw))
    raw_by_key = dict(overrides)
    for _ in range(len(raw_by_key) + 1):
        try:
            return path.stem, Recipe.model_validate(tree)
        except ValidationError as err:
            # A string field given "123" or "true" on the command line: YAML read it as a number or a
            # bool. Keep the user's literal text for exactly those keys and validate again.
            retyped = [k for k in _string_type_errors(err) if k in raw_by_key]
            if not retyped:
                raise UserError(format_errors(err, tree, source=str(path))) from None
            for key in retyped:
                set_path(tree, key, raw_by_key.pop(key))
    raise AssertionError("unreachable")


def _switch_method(tree: dict[str, Any], new_method: str | None) -> None:
    """`peft.method=X` on the command line replaces the recipe's method: its keys that X does not
    take are dropped (a LoRA rank means nothing to prompt tuning); keys given on the command line
    are still checked against X."""
    from launcher.config.schema import PEFT_CLASSES

    peft = tree.get("peft")
    if not new_method or not isinstance(peft, dict) or new_method not in PEFT_CLASSES:
        return
    accepted = PEFT_CLASSES[new_method].model_fields
    tree["peft"] = {k: v for k, v in peft.items() if k in accepted}


def _string_type_errors(err: ValidationError) -> list[str]:
    return [".".join(map(str, _clean_loc(e["loc"]))) for e in err.errors() if e["type"] == "string_type"]


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member tags (e.g. 'lora' in peft.lora.r, 'str' in data.train.str)."""
    cleaned = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and (
            (i == 1 and loc[0] == "peft" and part in METHOD_NAMES) or part in ("str",) or "[" in part
        ):
            continue
        cleaned.append(part)
    return tuple(cleaned)


def _section_model(loc: tuple, tree: dict[str, Any]) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc` (so unknown keys can be matched against its fields)."""
    from launcher.config import schema

    model: type[BaseModel] = Recipe
    for depth, part in enumerate(loc[:-1]):
        if isinstance(part, int):
            continue
        if model is Recipe and part == "peft":
            method = (tree.get("peft") or {}).get("method")
            model = schema.PEFT_CLASSES.get(method)
            if model is None:
                return None
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [a for a in _classes_in(field.annotation)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _classes_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_classes_in(arg))
    return found


def format_errors(err: ValidationError, tree: dict[str, Any], source: str) -> str:
    """One readable message for all validation problems, each naming its key and a fix."""
    items = [(_clean_loc(e["loc"]), e) for e in err.errors()]
    locs = [loc for loc, _ in items]
    # Under a union (data.train: path or list of sources), keep only the deepest, most specific errors.
    items = [(loc, e) for loc, e in items if not any(o != loc and o[: len(loc)] == loc for o in locs)]
    lines, seen = [], set()
    for loc, e in items:
        line = _describe(loc, e, tree)
        if line not in seen:
            seen.add(line)
            lines.append(f"  - {line}")
    noun = "problem" if len(lines) == 1 else "problems"
    return f"recipe {source} has {len(lines)} {noun}:\n" + "\n".join(lines)


def _describe(loc: tuple, e: dict, tree: dict[str, Any]) -> str:
    key = ".".join(map(str, loc)) or "recipe"
    kind = e["type"]
    if kind == "extra_forbidden":
        model = _section_model(loc, tree)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"Did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?" if close else ""
        section = ".".join(map(str, loc[:-1])) or "the top level"
        return f"{key}: unknown key. {hint} Valid keys in {section}: {', '.join(valid)}".replace(".  ", ". ")
    if kind == "missing":
        return f"{key}: required, but not set"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = (tree.get("peft") or {}).get("method")
        close = difflib.get_close_matches(str(given), METHOD_NAMES, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"peft.method={given} is not a method.{hint} Choose one of: {', '.join(METHOD_NAMES)}"
    if kind == "literal_error":
        return f"{key}={e.get('input')!r} is not allowed: {e['msg'].replace('Input should be', 'use')}"
    message = e["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not loc:
        return message.replace("\n", "\n  - ")
    given = e.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    return f"{key}: {message}{shown}"
