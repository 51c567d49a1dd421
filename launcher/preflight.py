"""Checks that touch the file system but load nothing heavy: run by `validate` and before every run.

Every path the user gives (model, data files, output folder, DeepSpeed JSON) is checked here for
existence, kind (file or folder) and permission, so a wrong path costs one line and no model load.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.config.schema import Recipe
from launcher.errors import UserError
from launcher.outputs.trackers import tracker_problems

DATA_SUFFIXES = ".jsonl, .json, .csv or .parquet"


def preflight(recipe: Recipe, recipe_name: str) -> None:
    """Raise one UserError listing every problem with the paths the recipe names."""
    problems = [_model_problem(recipe.model.name)]
    if recipe.distill and recipe.distill.teacher:
        teacher = recipe.distill.teacher  # checked like model.name, and named as the user wrote it
        problem = _model_problem(teacher)
        problems.append(problem and problem.replace(f"model.name={teacher}", f"distill.teacher={teacher}", 1))
    for key, path in _data_paths(recipe):
        problems.append(_data_problem(key, path))
    problems.extend(_output_problems(recipe, recipe_name))
    problems.extend(tracker_problems(recipe.output.trackers))
    if recipe.distributed.backend == "deepspeed" and recipe.distributed.config:
        try:
            problems.extend(_deepspeed_problems(recipe))
        except (UserError, OSError) as err:
            problems.append(_describe(f"distributed.config={recipe.distributed.config}", err))
    problems = [p for p in problems if p]
    if problems:
        raise UserError("\n".join(problems))


def _describe(key: str, err: Exception) -> str:
    """A UserError's message, or an OSError as `key: reason (path)`, never a traceback."""
    if isinstance(err, OSError):
        return f"{key}: {err.strerror or err} ({err.filename})" if err.filename else f"{key}: {err}"
    return str(err)


def unreadable_problem(key: str, path: Path) -> str | None:
    """Say why the existing file `path` cannot be read, or None.

    os.access rather than a trial open(): opening a FIFO would block. It answers as open() would,
    so for root (who reads everything) a file's mode bits never make it unreadable.
    """
    if path.is_dir():
        return f"{key}: {path} is a folder, but a file is expected here"
    if not os.access(path, os.R_OK):
        return f"{key}: {path} cannot be read (permission denied)"
    return None


def _model_problem(name: str) -> str | None:
    """A local model must be a readable folder with config.json, or a readable .gguf/.zip file."""
    from launcher.model.sources import local_path_of

    key = f"model.name={name}"
    try:
        path = local_path_of(name)
        if path is None:
            return None  # a hub id: checked when it is downloaded
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                return f"{key}: folder {path} cannot be read (permission denied)"
            from launcher.model.run_folder import is_run_folder, run_artifact

            if is_run_folder(path):  # a finished tunefleet run: its artifact is the model
                run_artifact(path)
                return None
            if not (path / "config.json").is_file():
                return (f"{key}: folder {path} holds no config.json, so it is not a transformers model folder "
                        "(expected a model folder, a .gguf file or a .zip of a model folder)")
            return unreadable_problem(key, path / "config.json")
        if path.suffix not in (".gguf", ".zip"):
            return f"{key}: expected a model folder, a .gguf file or a .zip of a model folder"
        return unreadable_problem(key, path)
    except (UserError, OSError) as err:
        return _describe(key, err)


def _data_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(key as the user wrote it, path) for every data file of the recipe."""
    train = recipe.data.train
    paths = [("data.train", train)] if isinstance(train, str) else [
        (f"data.train[{i}].path", source.path) for i, source in enumerate(train)
    ]
    return paths + ([("data.eval", recipe.data.eval)] if recipe.data.eval else [])


def _data_problem(key: str, value: str) -> str | None:
    """A local data file must exist, be a file of a known type, and be readable (hub names pass)."""
    from launcher.config.assets import shipped_root
    from launcher.data.rows import LOCAL_LOADERS, resolve_data_path

    key = f"{key}={value}"
    try:
        local = resolve_data_path(value)
    except UserError as err:
        # resolve_data_path looks for files only: say so when the name is a folder.
        folder = next((p for p in (Path(value).expanduser(), shipped_root() / value) if p.is_dir()), None)
        if folder is not None:
            return f"{key}: {folder} is a folder, but a data file ({DATA_SUFFIXES}) is expected here"
        return f"{key}: {err}"
    except OSError as err:
        return _describe(key, err)
    if local is None:
        return None  # a hub data set
    if local.suffix.lower() not in LOCAL_LOADERS:
        return f"{key}: unknown file type {local.suffix or '(none)'}; use a {DATA_SUFFIXES} file"
    return unreadable_problem(key, local)


def _output_problems(recipe: Recipe, recipe_name: str) -> list[str]:
    """output.dir must be (or be creatable as) a writable folder; a new run may not reuse a used one."""
    from launcher.outputs.run_dir import check_free, render_dir

    key = f"output.dir={recipe.output.dir}"
    try:
        run_dir = render_dir(recipe.output.dir, recipe_name).absolute()
    except (KeyError, IndexError, ValueError) as err:  # str.format: an unknown {name} or a lone brace
        return [f"{key}: cannot fill in the folder name ({type(err).__name__}: {err}); "
                "the placeholders are {recipe} and {time}"]
    try:
        problem = _folder_problem(key, run_dir)
        if problem:
            return [problem]
        if recipe.train.resume == "never":
            check_free(run_dir)
    except UserError as err:
        return [str(err)]
    except OSError as err:
        return [_describe(key, err)]
    return []


def _folder_problem(key: str, folder: Path) -> str | None:
    """Why `folder` cannot be used or created as a writable folder, or None."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        if existing == folder:
            return f"{key}: {folder} is a file, but a folder is expected here"
        return f"{key}: {existing} is a file, so no folder can be made inside it"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == folder:
            return f"{key}: {folder} cannot be written (permission denied)"
        return f"{key}: {folder} cannot be created: {existing} is not writable (permission denied)"
    return None


def _deepspeed_problems(recipe: Recipe) -> list[str]:
    """The JSON exists, is a readable file, parses, leaves the recipe's values to the recipe, and suits the method."""
    from launcher.config.compat import backend_problem
    from launcher.distributed import deepspeed_config as ds

    name = recipe.distributed.config
    key = f"distributed.config={name}"
    if Path(name).expanduser().is_dir():
        return [f"{key}: {name} is a folder, but a DeepSpeed JSON file is expected here"]
    unreadable = unreadable_problem(key, ds.find_ds_config(name))
    if unreadable:
        return [unreadable]
    config = ds.read_ds_config(name)
    precision = None if recipe.train.precision == "auto" else {"fp32": "no"}.get(recipe.train.precision,
                                                                                   recipe.train.precision)
    ds.resolve(config, recipe, recipe.gradient_accumulation_steps, precision,
               source=str(ds.find_ds_config(name)))
    problem = backend_problem(recipe.peft.method, f"zero{ds.zero_stage(config)}")
    return [problem] if problem else []
