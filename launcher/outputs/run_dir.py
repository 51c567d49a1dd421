"""The run folder: chosen once by the main process, refused if it already holds a run."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import yaml

from launcher.errors import UserError
from launcher.outputs.run_files import METRICS_ROWS_FILE

RUN_MARKERS = ("recipe.yaml", METRICS_ROWS_FILE)


def render_dir(template: str, recipe_name: str, key: str = "output.dir") -> Path:
    """The folder `template` names now: {recipe} and {time} filled in. Any other brace is a mistake
    named in one message (str.format would raise KeyError or ValueError from deep inside)."""
    try:
        return Path(template.format(recipe=recipe_name, time=time.strftime("%Y%m%d-%H%M%S")))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"{key}={template}: cannot fill in the folder name ({type(err).__name__}: {err}); "
                        "the placeholders are {recipe} and {time}; write {{ and }} for a brace itself") from None


def check_free(run_dir: Path) -> None:
    """A run never writes into another run's folder: nothing of it may be lost."""
    if any((run_dir / marker).exists() for marker in RUN_MARKERS):
        raise UserError(f"output.dir {run_dir} already holds a run; choose another output.dir, "
                        "or continue it with train.resume=auto")


def write_resolved_recipe(run_dir: Path, recipe, command: list[str]) -> None:
    """The recipe exactly as this run used it. The schema has no secret fields, so none can leak here.

    Its output.dir names this run's folder, which a new run may not reuse, so the re-run command
    in the header gives a fresh folder next to it. Commands are shell-quoted, to be copied as they are.
    """
    rerun = ["tunefleet", "run", f"recipe={run_dir / 'recipe.yaml'}", f"output.dir={run_dir}-rerun-{{time}}"]
    lines = ["Resolved recipe of this run. Re-run it into a new folder with:", "  " + shlex.join(rerun),
             "Started as: " + shlex.join(command)]
    # Split again: a newline inside a quoted value must not end the YAML comment.
    header = "".join(f"# {line}\n" for text in lines for line in text.split("\n"))
    body = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    (run_dir / "recipe.yaml").write_text(header + body)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
