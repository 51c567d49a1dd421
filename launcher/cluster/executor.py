"""The executor interface: what `status`, `cancel`, `collect`, `logs` and a search need from a scheduler.

An executor is a module with these functions (Slurm: launcher.cluster.slurm_executor; this
machine: launcher.cluster.local_executor). Another scheduler is one more module with the same
functions and one line in EXECUTORS. Submission itself differs by nature (a batch script and a job
array for Slurm, a supervisor process locally) and lives in launcher.cluster.submit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

# Scheduler states in which a job may still run (or run again: a requeued job passes through
# REQUEUED and PENDING). Any other state is one the job ended in.
LIVE_STATES = frozenset({"pending", "configuring", "running", "completing", "suspended", "requeued", "requeue_fed",
                         "requeue_hold", "resizing", "signaling", "stage_out", "stopped", "resv_del_hold",
                         "special_exit"})


@dataclass(frozen=True)
class JobView:
    """What the scheduler says of one job (one array task)."""

    state: str  # lower case, as Slurm names it: pending, running, completed, timeout, node_fail, ...
    reason: str = ""  # why it is pending, or why it ended (TimeLimit, ...)
    nodes: str = ""  # the nodes a running job holds, as Slurm abbreviates them: node[1-2]
    restarts: int = 0
    exit_code: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


class SchedulerDidNotAnswer(Exception):
    """The scheduler could not be asked (squeue failed or timed out): nothing is known, which is
    not the same as "the job left the queue". Callers wait and ask again."""


class Executor(Protocol):
    def jobs(self, manifest: dict) -> dict[str, JobView]:
        """{job id: view} of the manifest's jobs that the scheduler still knows, in one query for them
        all; a job it no longer knows has left the queue. Raises SchedulerDidNotAnswer."""

    def cancel(self, manifest: dict, job_ids: list[str]) -> bool:
        """Cancel these jobs; True when the caller should mark them cancelled in the manifest itself."""

    def log_files(self, run_dir: Path) -> list[Path]:
        """A run's log files, oldest first."""


EXECUTORS = {"slurm": "launcher.cluster.slurm_executor", "local": "launcher.cluster.local_executor"}


def executor_for(manifest: dict) -> ModuleType:
    import importlib

    return importlib.import_module(EXECUTORS[manifest.get("executor", "slurm")])
