"""One live job per run folder: `tunefleet submit` holds the folder's claim while it submits.

Two jobs training into one folder interleave their checkpoints: a submit repeated while the first
job still pends, or retried after an sbatch that timed out but had created the job. So a submit
into a folder first takes its claim, RUN/slurm/submitting (SWEEP/slurm/submitting for a sweep),
created with O_EXCL: a second submit running at the same moment is refused. Holding it, submit
asks Slurm which jobs still pend or run for the folder, refuses if any does, runs sbatch and records
the job; then it lets the claim go. Jobs of a folder are found by the job ids its record names and
by squeue's command column, which is the folder's own batch script: that also finds a job whose
sbatch timed out after Slurm had created it, before anything recorded its id.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from launcher.errors import UserError

CLAIM_FILE = "submitting"


def _holder_gone(holder: dict) -> bool:
    """Whether the submit that left this claim has died (only knowable on its own host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextmanager
def claimed(folder: Path):
    """Hold `folder`'s claim for the duration of the block."""
    claim = Path(folder) / "slurm" / CLAIM_FILE
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(claim.read_text())
            except (OSError, ValueError):
                holder = {}
            if not _holder_gone(holder):
                raise UserError(f"{folder}: another `tunefleet submit` into this folder is under way "
                                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                                f"{holder.get('since', '?')}); wait for it. If it is not running any more, "
                                f"remove {claim} and submit again") from None
            claim.unlink(missing_ok=True)  # its submit died: the claim is free
    else:
        raise UserError(f"{folder}: could not claim it for this submit ({claim} keeps coming back); try again")
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
    try:
        yield
    finally:
        claim.unlink(missing_ok=True)


def live_jobs(script: Path, job_ids: list[str]) -> dict[str, str]:
    """{job id: state} of this user's jobs still pending or running that run `script` or have one of
    `job_ids` (array tasks one by one, as ARRAY_TASK). Refuses when Slurm does not answer: without
    an answer, a second job could be started beside a live one."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%o"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"squeue did not answer ({err}); cannot tell whether a job still trains in "
                        f"{script.parent.parent}: submit again when Slurm answers") from None
    if done.returncode != 0:
        raise UserError(f"squeue failed ({done.stderr.strip()}); cannot tell whether a job still trains in "
                        f"{script.parent.parent}: submit again when Slurm answers")
    wanted = {str(j) for j in job_ids if j}
    live = {}
    for line in done.stdout.splitlines():
        job, state, command = (line.split("|", 2) + ["", ""])[:3]
        job = job.strip()
        if command.strip() == str(script) or job in wanted or job.split("_")[0] in wanted:
            live[job] = state.strip().lower()
    return live
