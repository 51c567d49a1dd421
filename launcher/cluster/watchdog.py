"""The hang watchdog of a Slurm job's training step: a run that writes no new step for a set time is ended.

A hung collective (a dead NCCL peer, a stuck file system) never returns and never fails: the job
would sit in its allocation until the time limit. The batch process watches the run's own files
(status.json, metrics.jsonl, the checkpoints folder); once the run has begun training in this
attempt and none of them changed for `hang_seconds`, it kills the step's tasks (SIGKILL through
Slurm: a hung rank cannot checkpoint, and SIGTERM would only wait for KillWait) and reports the
hang, which launcher.cluster.retry treats as an infrastructure failure.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

PROGRESS_FILES = ("status.json", "metrics.jsonl", "checkpoints")


def last_progress(run_dir: Path, since: float) -> float | None:
    """When the run last showed progress in this attempt; None until it has begun training (its status
    written since `since`): model loading and tokenizing are not watched."""
    times = {}
    for name in PROGRESS_FILES:
        try:
            times[name] = (Path(run_dir) / name).stat().st_mtime
        except OSError:
            continue
    if times.get("status.json", 0) < since:
        return None
    return max(times.values())


def wait_for_step(step: subprocess.Popen, run_dir: Path, hang_seconds: float, kill_step,
                  poll: float = 10.0) -> tuple[int, float | None]:
    """(the step's exit status, seconds without progress if the watchdog ended it, else None)."""
    started = time.time()
    while True:
        try:
            return step.wait(timeout=min(poll, hang_seconds / 4) if hang_seconds else None), None
        except subprocess.TimeoutExpired:
            pass
        last = last_progress(run_dir, started)
        if last is not None and time.time() - last > hang_seconds:
            idle = time.time() - last
            kill_step()
            return step.wait(), idle


def kill_step_of(job_id: str) -> None:
    """SIGKILL every task of the job's training steps (not its batch step: that is this process)."""
    listed = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    steps = [s for s in listed.stdout.split() if s.rpartition(".")[2].isdigit()]
    if steps:
        subprocess.run(["scancel", "--signal=KILL", *steps], capture_output=True, text=True)
