"""Checks that touch the file system but load nothing heavy: run by `validate` and before every run."""

from __future__ import annotations

from launcher.config.schema import Recipe
from launcher.errors import UserError


def preflight(recipe: Recipe, recipe_name: str) -> None:
    from launcher.data.rows import resolve_data_path
    from launcher.model.sources import local_path_of
    from launcher.outputs.run_dir import check_free, render_dir

    problems = []
    for label, call in [("model", lambda: local_path_of(recipe.model.name))] + [
        ("data", lambda p=source.path: resolve_data_path(p)) for source in recipe.data.sources
    ] + ([("data", lambda: resolve_data_path(recipe.data.eval))] if recipe.data.eval else []) + ([
        ("output", lambda: check_free(render_dir(recipe.output.dir, recipe_name)))
    ] if recipe.train.resume == "never" else []):
        try:
            call()
        except UserError as err:
            problems.append(str(err))
    if recipe.distributed.backend == "deepspeed" and recipe.distributed.config:
        try:
            problems.extend(_deepspeed_problems(recipe))
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise UserError("\n".join(problems))


def _deepspeed_problems(recipe: Recipe) -> list[str]:
    """The JSON exists, parses, leaves the recipe's values to the recipe, and suits the method."""
    from launcher.config.compat import backend_problem
    from launcher.distributed import deepspeed_config as ds

    config = ds.read_ds_config(recipe.distributed.config)
    precision = None if recipe.train.precision == "auto" else {"fp32": "no"}.get(recipe.train.precision,
                                                                                   recipe.train.precision)
    ds.resolve(config, recipe, recipe.gradient_accumulation_steps, precision,
               source=str(ds.find_ds_config(recipe.distributed.config)))
    problem = backend_problem(recipe.peft.method, f"zero{ds.zero_stage(config)}")
    return [problem] if problem else []
