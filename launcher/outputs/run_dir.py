"""The run folder: chosen once by the main process, refused if it already holds a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from launcher.errors import UserError

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl")


def render_dir(template: str, recipe_name: str) -> Path:
    return Path(template.format(recipe=recipe_name, time=time.strftime("%Y%m%d-%H%M%S")))


def check_free(run_dir: Path) -> None:
    """A run never writes into another run's folder: nothing of it may be lost."""
    if any((run_dir / marker).exists() for marker in RUN_MARKERS):
        raise UserError(f"output.dir {run_dir} already holds a run; choose another output.dir, "
                        "or continue it with train.resume=auto")


def write_resolved_recipe(run_dir: Path, recipe, command: list[str]) -> None:
    """The recipe exactly as this run used it. The schema has no secret fields, so none can leak here."""
    header = "# Resolved recipe of this run. Re-run with:\n#   tunefleet run recipe=" + str(run_dir / "recipe.yaml") + "\n"
    header += "# Started as: " + " ".join(command) + "\n"
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    (run_dir / "recipe.yaml").write_text(header + body)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
