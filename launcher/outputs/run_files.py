"""Reading a run's and a sweep's files from outside the run: one reader per file, for every command.

    RUN/status.json        the run's state (launcher.outputs.status writes it)
    RUN/metrics.jsonl      one row per logged step (launcher.outputs.metrics_log)
    RUN/metrics.json       the summary a finished run writes (launcher.train.finish)
    RUN/submission.json    a run submitted alone to Slurm (launcher.cluster.submit; `cancel` marks it)
    RUN/best/, RUN/final/  the saved artifacts (launcher.train.selection, launcher.train.finish)
    SWEEP/manifest.json    every run of a sweep or search (launcher.cluster.sweep)

`tunefleet status`, `logs`, `cancel`, `collect`, `submit`, the Slurm batch process, the local
executor and the search driver all read these while runs write them, so the readers decide once
what a missing or half-written file means. status.json and metrics.jsonl are read tolerantly (a
line being written is skipped; an unreadable status is "unknown"); the others are written whole
(atomically) and read as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import UserError

STATUS_FILE = "status.json"
METRICS_ROWS_FILE = "metrics.jsonl"
SUMMARY_FILE = "metrics.json"
SUBMISSION_FILE = "submission.json"
MANIFEST_FILE = "manifest.json"
FINISHED = "finished"


@dataclass(frozen=True)
class RunStatus:
    """RUN/status.json as recorded."""

    state: str | None = None  # running, interrupted, finished, failed; "unknown" when unreadable; None: no record
    step: int | None = None
    total_steps: int | None = None
    error: str | None = None  # why a failed run failed


def read_status(run_dir: Path) -> RunStatus:
    """The recorded status; runs written before status.json existed count as finished if metrics.json is there."""
    path = Path(run_dir) / STATUS_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return RunStatus(state="unknown")
        return RunStatus(state=record.get("state"), step=record.get("step"), total_steps=record.get("total_steps"),
                         error=record.get("error"))
    if (Path(run_dir) / SUMMARY_FILE).is_file():
        return RunStatus(state=FINISHED)
    return RunStatus()


def is_finished(run_dir: Path) -> bool:
    return read_status(run_dir).state == FINISHED


def read_metric_rows(run_dir: Path) -> list[dict]:
    """Every row of RUN/metrics.jsonl so far (none before the first is written)."""
    path = Path(run_dir) / METRICS_ROWS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return rows


def metric_points(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every logged row holding `metric` (an evaluation during training), in order."""
    return [(row["step"], row[metric]) for row in read_metric_rows(run_dir) if metric in row and "step" in row]


@dataclass(frozen=True)
class BestEval:
    """The evaluation the run kept its `best/` artifact for."""

    metric: str | None
    value: float | None
    step: int | None = None


@dataclass(frozen=True)
class RunSummary:
    """RUN/metrics.json: the parts that commands outside the run read."""

    steps: int | None = None
    train_loss: float | None = None
    runtime_s: float | None = None
    best: BestEval | None = None
    eval_final: dict[str, float] = field(default_factory=dict)  # the evaluation after training, by metric key


def read_summary(run_dir: Path) -> RunSummary | None:
    """The finished run's summary; None while it has none (it has not finished)."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    best = summary.get("best")
    return RunSummary(steps=summary.get("steps"), train_loss=summary.get("train_loss"),
                      runtime_s=summary.get("runtime_s"),
                      best=BestEval(best.get("metric"), best.get("value"), best.get("step")) if best else None,
                      eval_final=summary.get("eval_final") or {})


# A run's artifact, as collect, search reports and a run folder used as a model source pick it: the best
# evaluation's when the run kept one, else the final weights.
ARTIFACT_NAMES = ("best", "final")


def saved_artifact(run_dir: Path) -> Path | None:
    """best/ if the run kept one, else final/; None while neither holds a saved model or adapter.

    best/ and final/ are published whole (renamed into place), so a folder holding its config is complete."""
    for name in ARTIFACT_NAMES:
        folder = Path(run_dir) / name
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def has_submission(run_dir: Path) -> bool:
    """Whether the folder is a run submitted to Slurm on its own (or as a search's trial)."""
    return (Path(run_dir) / SUBMISSION_FILE).is_file()


def read_submission(run_dir: Path) -> dict | None:
    """What the run's last submission recorded (words, job id, state, ...); None if it was never submitted."""
    path = Path(run_dir) / SUBMISSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_submission(run_dir: Path, record: dict) -> None:
    """Replace RUN/submission.json whole (`submit` records each job, `cancel` marks it cancelled)."""
    from launcher.outputs.run_dir import write_json

    write_json(Path(run_dir) / SUBMISSION_FILE, record)


def is_sweep(folder: Path) -> bool:
    """Whether the folder is a sweep's or search's (it has a manifest)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(path: Path) -> dict:
    """The manifest of a sweep folder, or a one-run manifest for a run folder submitted alone."""
    path = Path(path)
    if is_sweep(path):
        return json.loads((path / MANIFEST_FILE).read_text())
    record = read_submission(path)
    if record is not None:
        return {"sweep_dir": None, "executor": record.get("executor", "slurm"),
                "runs": [{"name": path.name, "run_dir": str(path), "overrides": {}, **record}]}
    raise UserError(f"{path} is neither a sweep folder (no {MANIFEST_FILE}) nor a submitted run "
                    f"(no {SUBMISSION_FILE})")
