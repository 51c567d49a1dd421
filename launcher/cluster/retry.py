"""Retrying a run that failed for a reason that is not the recipe's: a rank lost to a broken NCCL link,
a GPU fault, a node failure, a step that stopped making progress.

launcher.cluster.job reads what the training step printed in this attempt (its share of the job's
log), and `diagnose` decides. Only failures that match a known signature of the machine or the
network are retried; anything else (a UserError, a Python exception in the recipe's data or model,
an out-of-memory) fails the job as before: retrying a user error wastes the queue and hides the
message. A retry is a requeue of the same job (its id, log and run folder stay), at most
`retries` times, recorded in RUN/slurm/retries.json.

The node the failure points at is excluded from the next attempt. Slurm takes ExcNodeList only
from a pending job, and a requeued job's batch process is killed before the job is pending again,
so a one-CPU job (`python -m launcher.cluster.retry exclude JOB NODES`) waits for the requeued
job to be pending and updates it. A requeued job may not start for about two minutes (Slurm's
credential lifetime), which leaves that job ample time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import UserError

RETRIES_FILE = "retries.json"
# What the machine or the network says when it fails: (pattern, name for the record, whether the
# evidence is local to the node that printed it, so that excluding that node helps). An NCCL
# timeout or a reset connection shows on the ranks that waited for a broken peer, not on the peer:
# retried, but no node is blamed.
SIGNATURES = (
    (re.compile(r"uncorrectable ECC error|unspecified launch failure|CUDA-capable device\(s\) is/are busy or "
                r"unavailable|cudaErrorDevicesUnavailable|CUDA driver initialization failed|Xid \d+|"
                r"GPU is lost|fell off the bus|but CUDA sees \d+|but CUDA is not available there|"
                r"GPU\(s\), the head node \d+"), "GPU fault", True),
    (re.compile(r"srun: error: Node failure on|NODE_FAIL"), "node failure", True),
    (re.compile(r"NCCL (?:error|WARN .*(?:timeout|unhandled))|ncclSystemError|ncclInternalError|ncclRemoteError|"
                r"NCCL communicator was aborted|Watchdog caught collective operation timeout"), "NCCL failure", False),
    (re.compile(r"DistNetworkError|RendezvousConnectionError|RendezvousTimeoutError"), "network failure", False),
)
# Whatever else the log says, these are the recipe's (sizes, data, code): never retried.
USERS_OWN = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory|oom-kill|Out Of Memory")
# torchrun's report of the rank that failed first, and the last Python traceback: the failure itself,
# not what other ranks or libraries printed while it happened.
ROOT_CAUSE = "Root Cause (first observed failure)"
TRACEBACK = "Traceback (most recent call last):"
FAILED_NODE = re.compile(r"srun: error: (?:Node failure on (\S+)|(\S+): tasks? [\d,-]+: Exited with exit code [1-9])")
NODE_ERROR = re.compile(r"^error \(node (\S+)\):", re.M)  # launcher.cluster.node's own refusals
USER_ERROR_EXIT = 2  # UserError.exit_code: a mistake in the recipe or its files, named already


@dataclass(frozen=True)
class InfrastructureFailure:
    kind: str  # NCCL failure, GPU fault, network failure, node failure, hang
    evidence: str  # the line that showed it
    nodes: tuple[str, ...]  # the node to run without next time (none when the evidence names no culprit)


def failure_itself(output: str) -> str:
    """The part of the step's output that says why it failed: torchrun's root-cause report, else the last
    Python traceback, else everything (a step killed without a traceback)."""
    if ROOT_CAUSE in output:
        return output[output.rindex(ROOT_CAUSE):]
    if TRACEBACK in output:
        return output[output.rindex(TRACEBACK):]
    return output


def diagnose(output: str, code: int) -> InfrastructureFailure | None:
    """An infrastructure failure if the step's output shows one; None for a user's error or anything unknown."""
    if code in (0, USER_ERROR_EXIT):
        return None
    scope = failure_itself(output)
    if USERS_OWN.search(scope):
        return None
    srun_lines = "\n".join(line for line in output.splitlines() if line.startswith(("srun: error:", "error (node")))
    for pattern, kind, node_local in SIGNATURES:
        found = pattern.search(scope) or (pattern.search(srun_lines) if node_local else None)
        if not found:
            continue
        text = found.string
        line = text[text.rfind("\n", 0, found.start()) + 1:].split("\n", 1)[0].strip()
        return InfrastructureFailure(kind, line[:300], _culprit(output) if node_local else ())
    return None


def _culprit(output: str) -> tuple[str, ...]:
    """The node that failed first: the one that refused (launcher.cluster.node), else the first that srun
    reports failing or lost."""
    named = NODE_ERROR.search(output)
    if named:
        return (named.group(1),)
    first = FAILED_NODE.search(output)
    return (first.group(1) or first.group(2),) if first else ()


def past_retries(run_dir: Path, job_id: str | None = None) -> list[dict]:
    """The retries recorded for the run (of one job only, if given: a run submitted again starts with its
    full budget). A record that cannot be read counts as none: it must not stop the job's decision."""
    path = Path(run_dir) / "slurm" / RETRIES_FILE
    try:
        entries = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        return []
    return [e for e in entries if job_id is None or e.get("job") == job_id]


def record_retry(run_dir: Path, job_id: str, restart: int, failure: InfrastructureFailure) -> None:
    from launcher.outputs.atomic import write_text_atomic

    entries = [*past_retries(run_dir), {"job": job_id, "restart": restart, **asdict(failure),
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    (Path(run_dir) / "slurm").mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run_dir) / "slurm" / RETRIES_FILE, json.dumps(entries, indent=1) + "\n")


def exclusion_command(job_id: str, nodes: tuple[str, ...], run_dir: Path, environ=os.environ) -> list[str]:
    """The sbatch line of the one-CPU job that excludes `nodes` from the requeued job once it is pending.
    It runs where the job ran (partition, account, QOS, reservation of this job)."""
    where = [f"--{option}={environ[name]}" for option, name in (("partition", "SLURM_JOB_PARTITION"),
                                                                ("account", "SLURM_JOB_ACCOUNT"),
                                                                ("qos", "SLURM_JOB_QOS"),
                                                                ("reservation", "SLURM_JOB_RESERVATION"))
             if environ.get(name)]
    wrap = shlex.join([sys.executable, "-m", "launcher.cluster.retry", "exclude", job_id, ",".join(nodes)])
    return ["sbatch", "--parsable", f"--job-name=tf-exclude-{job_id}"[:64], "--nodes=1", "--ntasks=1",
            "--cpus-per-task=1", "--time=00:10:00", *where, f"--output={Path(run_dir) / 'slurm' / 'exclude-%j.out'}",
            f"--chdir={Path.cwd()}", f"--wrap={wrap}"]


def nodes_to_exclude(job_id: str, nodes: tuple[str, ...], needed: int, environ=os.environ) -> tuple[list[str], str]:
    """(nodes to add to the job's exclusions, why none where none): never so many that the partition no
    longer holds the nodes the job needs, which would leave it pending for ever."""
    from launcher.cluster.slurm_env import expand_nodelist
    from launcher.cluster.slurm_executor import job_details

    listed = job_details(job_id).get("excluded", "")
    excluded = set(expand_nodelist(listed)) if listed else set()
    new = [n for n in nodes if n not in excluded]
    partition = environ.get("SLURM_JOB_PARTITION", "")
    sizes = subprocess.run(["sinfo", "-h", *(["-p", partition] if partition else []), "-o", "%D"],
                           capture_output=True, text=True).stdout.split()
    total = sum(int(n) for n in sizes if n.isdigit())
    if new and total and total - len(excluded) - len(new) < needed:
        return [], (f"partition {partition or '(default)'} has {total} node(s), {len(excluded)} excluded already; "
                    f"the job needs {needed}")
    return new, ""


# States in which a job may still become pending again (after its requeue); any other is an end.
NOT_ENDED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
             "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def exclude_when_pending(job_id: str, nodes: list[str], timeout: float = 600, poll: float = 1.0) -> int:
    """Wait until the requeued job is pending again, then add `nodes` to its ExcNodeList."""
    from launcher.cluster.slurm_env import expand_nodelist
    from launcher.cluster.slurm_executor import job_details

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        details = job_details(job_id)
        state = details.get("state", "").upper()
        if state == "PENDING":
            before = expand_nodelist(details["excluded"]) if details.get("excluded") else []
            merged = ",".join(dict.fromkeys([*before, *nodes]))
            done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={merged}"],
                                  capture_output=True, text=True)
            print(f"[tunefleet] job {job_id}: ExcNodeList={merged}" + (f" failed: {done.stderr.strip()}"
                                                                      if done.returncode else ""), flush=True)
            return done.returncode
        if state and state not in NOT_ENDED:
            print(f"[tunefleet] job {job_id} is {state}: nothing to exclude", flush=True)
            return 0
        time.sleep(poll)
    print(f"[tunefleet] job {job_id} was not pending within {timeout:.0f} s: {', '.join(nodes)} not excluded",
          flush=True)
    return 1


class JobLog:
    """This job's own log (its standard output, a file Slurm or sweep_task_words opened), read from a
    point on: what the training step printed in this attempt, for launcher.cluster.retry to read."""

    LIMIT = 4 << 20  # the tail worth reading: the end of a step's output says why it ended

    def __init__(self, path: str | None, offset: int):
        self.path, self.offset = path, offset

    @classmethod
    def here(cls) -> "JobLog":
        sys.stdout.flush()
        try:
            path = os.readlink("/proc/self/fd/1")
            return cls(path if os.path.isfile(path) else None, os.fstat(1).st_size)
        except OSError:
            return cls(None, 0)

    def since(self) -> str:
        if self.path is None:
            return ""
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(self.offset, size - self.LIMIT))
            return f.read().decode("utf-8", "replace")

def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if len(words) != 3 or words[0] != "exclude":
        raise SystemExit("usage: python -m launcher.cluster.retry exclude JOB NODE[,NODE...]")
    return exclude_when_pending(words[1], [n for n in words[2].split(",") if n])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
