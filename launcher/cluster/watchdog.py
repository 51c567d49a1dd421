"""The hang watchdog of a Slurm job's training step: a run that makes no new step for a set time is ended.

A hung collective (a dead NCCL peer, a stuck file system) never returns and never fails: the job
would sit in its allocation until the time limit. Rank 0 beats a heartbeat file after every step
(launcher.train.heartbeat: RUN/slurm/heartbeat); while it says `training` and has not beaten for
`hang_seconds`, the batch process kills the step's tasks (SIGKILL through Slurm: a hung rank cannot
checkpoint, and SIGTERM would only wait for KillWait) and reports the hang, which
launcher.cluster.retry treats as an infrastructure failure. Model loading, evaluations,
checkpoints and the final save say so in the file and are not timed: they may rightly take long.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from launcher.train.heartbeat import TRAINING

HEARTBEAT = "heartbeat"  # in RUN/slurm/


def last_progress(run_dir: Path, since: float) -> float | None:
    """When the run last made a step in this attempt; None while it is not training (loading, evaluating,
    checkpointing, finishing, or a heartbeat left by an earlier attempt)."""
    path = Path(run_dir) / "slurm" / HEARTBEAT
    try:
        beaten = path.stat().st_mtime
        phase = path.read_text().strip()
    except OSError:
        return None
    return beaten if beaten >= since and phase == TRAINING else None


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


def kill_step_of(job_id: str, step: subprocess.Popen) -> None:
    """SIGKILL every task of the job's training steps (not its batch step: that is this process). Where
    Slurm does not answer, srun itself is told to end the step (SIGTERM, then SIGKILL after 30 s)."""
    try:
        listed = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                                timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    steps = [s for s in listed.split() if s.rpartition(".")[2].isdigit()]
    if steps:
        subprocess.run(["scancel", "--signal=KILL", *steps], capture_output=True, text=True, timeout=30)
        return
    step.terminate()
    try:
        step.wait(timeout=30)
    except subprocess.TimeoutExpired:
        step.kill()
