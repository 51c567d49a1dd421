"""The local two-node Slurm of slurm/local-cluster.sh, for tests: start it (installing Slurm where
missing), submit batch scripts, wait for jobs, stop it.

    env, started = ensure_cluster()            # {"SLURM_CONF": ...}; started is False if it already ran
    job = submit("job.sbatch", ["--nodes=2"], env)
    assert wait_for_job(job, env, timeout=60) == "COMPLETED"
    if started:
        stop_cluster()                         # leave a cluster someone else started running

The cluster keeps no accounting, so `sacct` knows nothing: a job's state comes from `squeue` while
Slurm has it queued or running, then from `scontrol show job` (finished jobs stay there for
MinJobAge=600 s). Where the cluster lives (TUNEFLEET_SLURM_DIR, ports) comes from the environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"

# Job states after which nothing more happens to the job (a requeued job passes through
# REQUEUED/PENDING instead).
FINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})


def _script(action: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"slurm/local-cluster.sh {action} failed (exit {done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")
    return done


def ensure_cluster() -> tuple[dict[str, str], bool]:
    """Start the cluster (installing Slurm first where missing; idempotent). Return the environment
    variables Slurm's client commands need, and whether this call started it: a cluster that was
    already running is someone else's to stop. Also sets SLURM_CONF in this process's environment,
    for the launcher's own squeue/scontrol calls from the test process."""
    done = _script("start", timeout=600)  # an install from scratch takes ~20 s, start ~1 s
    line = next((line for line in done.stdout.splitlines() if line.startswith("export SLURM_CONF=")), None)
    if line is None:
        raise RuntimeError(f"slurm/local-cluster.sh start printed no SLURM_CONF:\n{done.stdout}")
    conf = shlex.split(line)[1].split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    return {"SLURM_CONF": conf}, "already running" not in done.stdout


def stop_cluster() -> None:
    """Cancel every job and stop every daemon (up to ~45 s if jobs ignore SIGTERM; ~1 s otherwise)."""
    _script("stop", timeout=180)


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    # Callers may pass just ensure_cluster()'s variables: the client commands still need PATH etc.
    return {**os.environ, **(env or {})}


def submit(script_path: str | os.PathLike, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
           script_args: Sequence[str] = (), cwd: str | os.PathLike | None = None) -> str:
    """`sbatch --parsable ARGS SCRIPT SCRIPT_ARGS`; return the job id. `args` are sbatch options."""
    done = subprocess.run(["sbatch", "--parsable", *args, str(script_path), *script_args], env=_env(env),
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip()}")
    # --parsable prints "ID" or "ID;CLUSTER".
    return done.stdout.strip().splitlines()[-1].split(";")[0]


class SlurmUnreachable(RuntimeError):
    """squeue/scontrol could not reach slurmctld (not running, or busy past its timeout)."""


def job_state(job_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """The job's state now (PENDING, RUNNING, COMPLETED, ...), or None if Slurm does not know it.
    For a job array, the first state that is not COMPLETED, if any. Raises SlurmUnreachable."""
    full_env = _env(env)
    queued = subprocess.run(["squeue", "-h", f"--jobs={job_id}", "-o", "%T"], env=full_env,
                            capture_output=True, text=True, timeout=30)
    # squeue lists pending, running and completing jobs only; it fails on an id it no longer has.
    states = queued.stdout.split() if queued.returncode == 0 else []
    if not states:
        shown = subprocess.run(["scontrol", "show", "job", str(job_id)], env=full_env,
                               capture_output=True, text=True, timeout=30)
        if shown.returncode != 0:
            if "Invalid job id" in shown.stderr:
                return None
            raise SlurmUnreachable(f"scontrol show job {job_id}: {shown.stderr.strip()}")
        states = re.findall(r"\bJobState=(\S+)", shown.stdout)
    if not states:
        return None
    return next((state for state in states if state != "COMPLETED"), "COMPLETED")


def wait_for_job(job_id: str, env: Mapping[str, str] | None = None, timeout: float = 120.0,
                 poll: float = 0.5) -> str:
    """Wait until the job has ended for good; return its final state (COMPLETED, FAILED, CANCELLED,
    TIMEOUT, ...). A requeued job is waited for through its next attempt. Raises TimeoutError after
    `timeout` seconds (also when slurmctld stays unreachable), LookupError if Slurm does not know the job."""
    deadline = time.monotonic() + timeout
    state: str | None = "unknown"
    while True:
        try:
            state = job_state(job_id, env)
        except SlurmUnreachable as error:
            state = f"unknown ({error})"
        else:
            if state is None:
                raise LookupError(f"Slurm knows no job {job_id} (never submitted, or ended over MinJobAge ago)")
            if state in FINAL_STATES:
                return state
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
        time.sleep(poll)


# ---------------------------------------------------------------------------- tunefleet against the cluster

# One process per node; global batch 4 = micro 2 x accumulation 1 x 2 ranks; dropout off so runs agree.
TRAIN = ["peft.dropout=0", "train.global_batch_size=4", "train.micro_batch_size=2", "eval.every_steps=null",
         "eval.at_start=false", "eval.sample_prompts=[]", "data.max_samples=200", "data.max_eval_samples=16"]


def tunefleet(env, *words, timeout=120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "launcher.cli", *words], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done


def tunefleet_submit(env, *words) -> str:
    """`tunefleet submit` on the cluster; the job id it printed."""
    done = tunefleet(env, "submit", *words)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("submitted job ")[1].split(":")[0].split()[0]


def job_env(slurm) -> dict:
    return {**os.environ, **slurm, "OMP_NUM_THREADS": "1"}


def wait_state(env, path: Path, wanted: set[str], timeout: float, seen: set | None = None) -> str:
    """Poll `tunefleet status` until every run is in one of `wanted`; `seen` collects each state shown."""
    deadline, table = time.time() + timeout, ""
    while time.time() < deadline:
        table = tunefleet(env, "status", str(path)).stdout
        states = {line.split()[3] for line in table.splitlines()[1:] if len(line.split()) > 3}
        if seen is not None:
            seen.update(states)
            seen.update(line.split("(")[1].split(")")[0] for line in table.splitlines() if "pending (" in line)
        if states and states <= wanted:
            return table
        time.sleep(1)
    raise AssertionError(f"not {wanted} after {timeout} s:\n{table}\n" + "".join(
        p.read_text()[-3000:] for p in path.rglob("slurm-*.out")))


def scontrol_job(env, job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
