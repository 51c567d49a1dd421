"""Experiment trackers (output.trackers): TensorBoard, MLflow, W&B, all through accelerate.

accelerate's own tracker classes do the work; this module only configures them for a run and
hands them to the run's Accelerator, so that the loop's one `accelerator.log` call reaches every
tracker, from the main process only. They are made here, once the run folder exists, rather than
by name when the Accelerator is created: the folder (TensorBoard's place, the default run name) is
chosen after the Accelerator, and a resumed run continues the tracker runs it started.

What each tracker receives: every metrics.jsonl value (as train/NAME or eval/NAME) at its optimizer
step, and once, the resolved recipe flattened to `section.key` hyperparameters. The recipe schema has
no secret fields; addresses and keys (MLFLOW_TRACKING_URI, WANDB_API_KEY, WANDB_MODE...) are read by
mlflow and wandb from the environment and never pass through here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from launcher.train.build import Run

# Tracker -> (module it imports, the pip extra that installs it).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", None), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# The tracker runs a run folder started, so that a resumed run continues them instead of opening new ones.
IDS_FILE = "trackers.json"


def tracker_problems(trackers: list[str]) -> list[str]:
    """Trackers whose package is not installed, each with the command that installs it (no import)."""
    problems = []
    for name in dict.fromkeys(trackers):
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            fix = f"pip install 'tunefleet[{extra}]'" if extra else f"pip install {module}"
            problems.append(f"output.trackers: {name} is selected but its package {module} is not installed; "
                            f"run {fix}, or remove {name} from output.trackers")
    return problems


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """`{"train": {"lr": 1e-4}}` -> `{"train.lr": 1e-4}`; lists become JSON text, which every tracker stores."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def hyperparameters(run: Run) -> dict[str, object]:
    """The resolved recipe as flat `section.key` values, and what the run derived from it."""
    values = flatten(run.recipe.model_dump(mode="json"))
    values.update({"run.world_size": run.accelerator.num_processes, "run.total_steps": run.total_steps,
                   "run.gradient_accumulation_steps": run.plan.accumulation,
                   "run.trainable_params": run.trainable_params, "run.total_params": run.total_params})
    return values


def _make(name: str, run: Run, run_name: str, resumed_at: int, previous: dict):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        # RUN/tensorboard; purge_step drops the events an interrupted attempt wrote after the checkpoint.
        return TensorBoardTracker("tensorboard", run.run_dir, purge_step=resumed_at + 1 if resumed_at else None)
    if name == "mlflow":
        return MLflowTracker(experiment_name=run.recipe.output.project, run_name=run_name,
                             run_id=previous.get("mlflow"), description=f"tunefleet run folder: {run.run_dir}")
    # WandBTracker's first argument is the W&B project; the offline folder goes to RUN/wandb.
    return WandBTracker(run.recipe.output.project, name=run_name, dir=str(run.run_dir),
                        id=previous.get("wandb"), resume="allow" if previous.get("wandb") else None)


def start_trackers(run: Run, resumed_at: int) -> str | None:
    """Start the recipe's trackers on the run's Accelerator; return a line saying where they log.

    `resumed_at` is the step a resumed run continues from (0 for a fresh one). Only the main
    process starts anything; the others keep no trackers, so their `accelerator.log` does nothing.
    """
    names = list(dict.fromkeys(run.recipe.output.trackers))
    if not names or not run.is_main:
        return None
    ids_path = Path(run.run_dir) / IDS_FILE
    previous = json.loads(ids_path.read_text()) if resumed_at and ids_path.exists() else {}
    run_name = run.recipe.output.run_name or Path(run.run_dir).name
    # accelerate takes tracker instances in log_with; the Accelerator exists already, so they are set here.
    run.accelerator.log_with = [_make(name, run, run_name, resumed_at, previous) for name in names]
    # A resumed run logged its hyperparameters when it started (MLflow refuses to change a logged one).
    run.accelerator.init_trackers(run.recipe.output.project, config=None if previous else hyperparameters(run))
    ids, where = {}, []
    for name in names:
        tracker = run.accelerator.get_tracker(name)
        if name == "tensorboard":
            where.append(f"tensorboard: {tracker.logging_dir}")
        elif name == "mlflow":
            import mlflow

            ids["mlflow"] = tracker.active_run.info.run_id
            where.append(f"mlflow: run {ids['mlflow']} in experiment {tracker.experiment_name} at "
                         f"{without_credentials(mlflow.get_tracking_uri())}")
        else:
            ids["wandb"] = tracker.run.id
            where.append(f"wandb: run {tracker.run.id} ({tracker.run.settings.mode}) in project {tracker.run.project}")
    ids_path.write_text(json.dumps(ids) + "\n")
    return "trackers: " + "; ".join(where)


def without_credentials(uri: str) -> str:
    """The URI with any user:password@ removed, so that it can be printed."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def close_trackers_as_failed(run: Run) -> None:
    """Close the tracker runs as failed: accelerator.end_training(), which follows, would say finished."""
    for tracker in run.accelerator.trackers:  # empty on the other processes
        try:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            elif tracker.name == "wandb":
                tracker.run.finish(exit_code=1)
        except Exception as err:  # an unreachable tracker must not hide the error that stopped the run
            print(f"[tunefleet] could not mark the {tracker.name} run failed: {err}", flush=True)
