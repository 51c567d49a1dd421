"""The executor interface: what `status`, `cancel` and `collect` need from a scheduler.

An executor is a module with these functions (Slurm: launcher.cluster.slurm_executor; this
machine: launcher.cluster.local_executor). Another scheduler is one more module with the same
functions and one line in EXECUTORS. Submission itself differs by nature (a batch script and a job
array for Slurm, a supervisor process locally) and lives in launcher.cluster.submit.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Protocol


class Executor(Protocol):
    def queue_states(self, manifest: dict) -> dict[str, dict]:
        """{job id: {"state": "pending"|"running"|..., "reason": why pending}} for jobs still queued or running."""

    def job_details(self, job_id: str) -> dict:
        """What the scheduler still knows of a job: state, restarts, exit_code (empty when forgotten)."""

    def cancel(self, manifest: dict, job_ids: list[str]) -> bool:
        """Cancel these jobs; True when the caller should mark them cancelled in the manifest itself."""

    def log_files(self, run_dir: Path) -> list[Path]:
        """A run's log files, oldest first."""


EXECUTORS = {"slurm": "launcher.cluster.slurm_executor", "local": "launcher.cluster.local_executor"}


def executor_for(manifest: dict) -> ModuleType:
    import importlib

    return importlib.import_module(EXECUTORS[manifest.get("executor", "slurm")])
