"""Slurm behind the executor interface (launcher.cluster.executor): state, cancel, logs.

One poll asks Slurm once for every job of a sweep, however many runs it has: one `squeue -t all`
(pending with its reason, running with its nodes, and the jobs that ended while slurmctld still
remembers them, MinJobAge), then, for the jobs it has forgotten, one `sacct` where accounting
answers. A job neither knows has left the queue; the run's own RUN/status.json says how it ended.
A failing squeue is not an empty queue: it raises SchedulerDidNotAnswer.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from launcher.cluster.executor import JobView, SchedulerDidNotAnswer

# Fields end in "|" and have no width, so values are neither padded nor cut.
SQUEUE_FORMAT = "JobArrayID:|,State:|,Reason:|,NodeList:|,RestartCnt:|,exit_code:|"
JOB_ID = re.compile(r"\d+(_\d+)?")  # a job, or one task of an array: 1234 or 1234_5
TIMEOUT_S = 30


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _job_ids(manifest: dict) -> list[str]:
    return [str(r["job_id"]) for r in manifest["runs"] if JOB_ID.fullmatch(str(r.get("job_id") or ""))]


def _squeue(ids: list[str]) -> dict[str, JobView]:
    argv = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-O", SQUEUE_FORMAT]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SchedulerDidNotAnswer(f"squeue: {err}") from None
    # Slurm refuses a list of ids it has all forgotten with this error: an answer, not a failure.
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SchedulerDidNotAnswer(f"squeue exited with status {done.returncode}: {said}")
    views = {}
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 6:
            continue
        job, state, reason, nodes, restarts, exit_code = fields[:6]
        views[job] = JobView(state=state.lower(), reason="" if reason in ("None", "(null)") else reason,
                             nodes="" if nodes in ("(null)", "None") else nodes,
                             restarts=int(restarts) if restarts.isdigit() else 0, exit_code=_exit_code(exit_code))
    return views


def _exit_code(raw: str) -> str:
    """squeue gives the wait status (768 for `exit 3`); scontrol and sacct write it as CODE:SIGNAL (3:0)."""
    return f"{int(raw) >> 8}:{int(raw) & 0x7F}" if raw.isdigit() else raw


def _accounting(ids: list[str]) -> dict[str, JobView]:
    """What sacct knows of jobs slurmctld has forgotten; nothing where accounting is off."""
    out = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State,ExitCode,NodeList"])
    views = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) >= 4 and fields[1]:
            views[fields[0]] = JobView(state=fields[1].split()[0].lower(), exit_code=fields[2], nodes=fields[3])
    return views


def jobs(manifest: dict) -> dict[str, JobView]:
    """{job id: view} for the manifest's jobs Slurm still knows: at most one squeue and one sacct."""
    wanted = _job_ids(manifest)
    if not wanted:
        return {}
    views = _squeue(sorted({j.split("_")[0] for j in wanted}, key=int))  # an array's id lists its tasks (-r)
    forgotten = [j for j in wanted if j not in views]
    if forgotten:
        views.update(_accounting(forgotten))
    return views


def job_details(job_id: str) -> dict:
    """State, restarts, exit code, reason and excluded nodes (Slurm's compressed list) of one job from
    `scontrol show job` (empty once Slurm forgot it): for the batch process deciding about its own
    requeue (launcher.cluster.job) and for the job that excludes a node from it (launcher.cluster.retry)."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    if not fields:
        return {}
    excluded = fields.get("ExcNodeList", "(null)")
    return {"state": fields.get("JobState", "").lower(), "restarts": int(fields.get("Restarts", 0) or 0),
            "exit_code": fields.get("ExitCode", ""), "reason": fields.get("Reason", ""),
            "excluded": "" if excluded == "(null)" else excluded}


def cancel(manifest: dict, job_ids: list[str]) -> bool:
    ids = [str(j) for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True)
    return True  # Slurm keeps no record of why: the manifest says it was cancelled


def _job_order(log: Path) -> tuple:
    """slurm-JOB.out or slurm-JOB_TASK.out: by job number (a resubmitted trial has a newer job), then time."""
    numbers = re.findall(r"\d+", log.name)
    return (int(numbers[0]) if numbers else float("inf"), log.stat().st_mtime)


def log_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "slurm").glob("slurm-*.out"), key=_job_order)
