"""Sweeps: a grid of runs from comma lists, each in its own folder, recorded in one manifest.

    tunefleet submit recipe=lora,qlora train.lr=1e-4,2e-4,4e-4      # 6 runs: the grid

A word whose value holds top-level commas (`key=a,b,c`) is a sweep axis; brackets and quotes keep
their commas (`peft.target_modules=[q_proj,v_proj]` is one value). Each run's folder is named
after the values that differ between runs, inside the sweep folder, and SWEEP/manifest.json
records every run: its words, folder, job id, state and restarts. The manifest is the one record
that `tunefleet status`, `cancel` and `collect` read (through launcher.outputs.run_files).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

from launcher.errors import UserError
from launcher.outputs.run_files import MANIFEST_FILE


def split_values(value: str) -> list[str]:
    """Top-level comma-separated values; commas inside [], {}, () or quotes belong to one value."""
    values, depth, quote, current = [], 0, None, ""
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return values


def expand_grid(words: list[str]) -> list[dict[str, str]]:
    """Every combination of the axes, as ordered {key: value} (keys in the order given)."""
    axes: list[tuple[str, list[str]]] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise UserError(f"'{word}' is not key=value")
        values = split_values(value)
        if any(v == "" for v in values) and len(values) > 1:
            raise UserError(f"{word}: an empty value in a comma list (a trailing comma?)")
        axes.append((key, values))
    return [dict(zip((k for k, _ in axes), combo)) for combo in itertools.product(*(v for _, v in axes))]


def varying_keys(runs: list[dict[str, str]]) -> list[str]:
    keys = list(runs[0]) if runs else []
    return [k for k in keys if len({run.get(k) for run in runs}) > 1]


def run_name(run: dict[str, str], varying: list[str]) -> str:
    """A folder name from the values that differ: `recipe-qlora_lr-2e-4` (safe characters only)."""
    parts = []
    for key in varying:
        short = key.rsplit(".", 1)[-1]
        value = re.sub(r"[^A-Za-z0-9.+-]+", "-", run[key]).strip("-") or "empty"
        parts.append(f"{short}-{value}")
    return "_".join(parts)[:120] or "run"


def unique_names(runs: list[dict[str, str]]) -> list[str]:
    varying = varying_keys(runs)
    names = [run_name(run, varying) for run in runs]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if names.count(name) > 1:  # values that differ only in characters a folder name drops
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}-{seen[name]}"
    return names


def new_manifest(sweep_dir: Path, runs: list[dict], executor: str) -> dict:
    return {"sweep_dir": str(sweep_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": executor,
            "runs": runs}


def write_manifest(sweep_dir: Path, manifest: dict) -> None:
    from launcher.outputs.atomic import write_text_atomic

    write_text_atomic(Path(sweep_dir) / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def word_value(value) -> str:
    """A YAML value as the command-line text an override would carry."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def load_sweep_file(path: str) -> list[dict[str, str]]:
    """Runs from a sweep YAML: `base` words for every run, the product of `grid`, crossed with
    `paired` (entries whose keys change together, e.g. rank and alpha).

        base: [recipe=lora, train.max_steps=200]
        grid: {train.lr: [1e-4, 2e-4, 4e-4]}
        paired: [{peft.r: 8, peft.alpha: 16}, {peft.r: 16, peft.alpha: 32}]
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"sweep={path}: no such file")
    spec = yaml.safe_load(file.read_text()) or {}
    unknown = set(spec) - {"base", "grid", "paired", "description"}
    if not isinstance(spec, dict) or unknown:
        raise UserError(f"{path}: a sweep file has the keys base, grid, paired (found {sorted(unknown)})")
    base = {}
    for word in spec.get("base", []):
        key, sep, value = str(word).partition("=")
        if not sep:
            raise UserError(f"{path}: base entry '{word}' is not key=value")
        base[key] = value
    grid = spec.get("grid", {}) or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: grid maps each key to a non-empty list of values")
    paired = spec.get("paired", [{}]) or [{}]
    if not isinstance(paired, list) or not all(isinstance(p, dict) for p in paired):
        raise UserError(f"{path}: paired is a list of mappings (keys that change together)")
    runs = []
    for combo in itertools.product(*grid.values()):
        for pair in paired:
            run = dict(base)
            run.update({k: word_value(v) for k, v in zip(grid, combo)})
            run.update({k: word_value(v) for k, v in pair.items()})
            runs.append(run)
    return runs


def cross(runs: list[dict[str, str]], more: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every run of `runs` with every run of `more` applied on top (command-line words win)."""
    return [{**a, **b} for a in runs for b in more]
