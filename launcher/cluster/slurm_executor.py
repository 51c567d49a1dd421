"""Slurm behind the executor interface (launcher.cluster.executor): state, cancel, logs.

State comes from the queue (`squeue`, with the pending reason) while a job is known to it, then
from `scontrol show job` (kept for MinJobAge after the end), and finally from the run's own
RUN/status.json, so it works without Slurm accounting; `sacct` is used where it answers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def queue_states(manifest: dict) -> dict[str, dict]:
    """{job id: {state, reason}} for jobs still in the queue (array tasks one by one)."""
    ids = sorted({str(r["job_id"]).split("_")[0] for r in manifest["runs"] if r.get("job_id")})
    if not ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    states = {}
    for line in out.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job.strip()] = {"state": state.strip().lower(), "reason": "" if reason in ("None", "") else reason}
    return states


def job_details(job_id: str) -> dict:
    """State, restarts and exit code from `scontrol show job` (empty once Slurm forgot the job)."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    if not fields:
        accounting = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"]).split("|")
        return {"state": accounting[0].split()[0].lower(), "exit_code": accounting[1].strip()} if accounting[0] else {}
    return {"state": fields.get("JobState", "").lower(), "restarts": int(fields.get("Restarts", 0) or 0),
            "exit_code": fields.get("ExitCode", ""), "reason": fields.get("Reason", "")}


def cancel(manifest: dict, job_ids: list[str]) -> bool:
    ids = [str(j) for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True)
    return True  # Slurm keeps no record of why: the manifest says it was cancelled


def log_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "slurm").glob("slurm-*.out"))
