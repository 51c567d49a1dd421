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
# What the machine or the network says when it fails; each with a short name for the record.
SIGNATURES = (
    (re.compile(r"NCCL (?:error|WARN .*(?:timeout|unhandled))|ncclSystemError|ncclInternalError|ncclRemoteError|"
                r"NCCL communicator was aborted|Watchdog caught collective operation timeout"), "NCCL failure"),
    (re.compile(r"uncorrectable ECC error|unspecified launch failure|CUDA-capable device\(s\) is/are busy or "
                r"unavailable|cudaErrorDevicesUnavailable|CUDA driver initialization failed|Xid \d+|"
                r"GPU is lost|fell off the bus"), "GPU fault"),
    (re.compile(r"DistNetworkError|RendezvousConnectionError|RendezvousTimeoutError|Connection reset by peer|"
                r"Connection closed by peer|No route to host"), "network failure"),
    (re.compile(r"srun: error: Node failure on|NODE_FAIL|Received signal 7|Signal 7 \(SIGBUS\)"), "node failure"),
)
FAILED_NODE = re.compile(r"srun: error: (?:Node failure on (\S+)|(\S+): tasks? [\d,-]+: Exited with exit code [1-9])")
USER_ERROR_EXIT = 2  # UserError.exit_code: a mistake in the recipe or its files, named already


@dataclass(frozen=True)
class InfrastructureFailure:
    kind: str  # NCCL failure, GPU fault, network failure, node failure, hang
    evidence: str  # the line that showed it
    nodes: tuple[str, ...]  # where it happened, as far as the log says (first failing node first)


def diagnose(output: str, code: int) -> InfrastructureFailure | None:
    """An infrastructure failure if the step's output shows one; None for a user's error or anything unknown."""
    if code in (0, USER_ERROR_EXIT):
        return None
    for pattern, kind in SIGNATURES:
        found = pattern.search(output)
        if found:
            line = output[output.rfind("\n", 0, found.start()) + 1:].split("\n", 1)[0].strip()
            nodes = []
            for match in FAILED_NODE.finditer(output):
                node = match.group(1) or match.group(2)
                if node not in nodes:
                    nodes.append(node)
            return InfrastructureFailure(kind, line[:300], tuple(nodes[:1]))
    return None


def past_retries(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "slurm" / RETRIES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def record_retry(run_dir: Path, job_id: str, restart: int, failure: InfrastructureFailure) -> None:
    from launcher.outputs.atomic import write_text_atomic

    entries = [*past_retries(run_dir), {"job": job_id, "restart": restart, **asdict(failure),
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    (Path(run_dir) / "slurm").mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run_dir) / "slurm" / RETRIES_FILE, json.dumps(entries, indent=1) + "\n")


def exclusion_command(job_id: str, nodes: tuple[str, ...], run_dir: Path, environ=os.environ) -> list[str]:
    """The sbatch line of the one-CPU job that excludes `nodes` from the requeued job once it is pending.
    It runs where the job ran (partition, account, QOS of this job)."""
    where = [f"--{option}={environ[name]}" for option, name in (("partition", "SLURM_JOB_PARTITION"),
                                                                ("account", "SLURM_JOB_ACCOUNT"),
                                                                ("qos", "SLURM_JOB_QOS")) if environ.get(name)]
    wrap = shlex.join([sys.executable, "-m", "launcher.cluster.retry", "exclude", job_id, ",".join(nodes)])
    return ["sbatch", "--parsable", f"--job-name=tf-exclude-{job_id}"[:64], "--nodes=1", "--ntasks=1",
            "--cpus-per-task=1", "--time=00:10:00", *where, f"--output={Path(run_dir) / 'slurm' / 'exclude-%j.out'}",
            f"--chdir={Path.cwd()}", f"--wrap={wrap}"]


def exclude_when_pending(job_id: str, nodes: list[str], timeout: float = 600, poll: float = 1.0) -> int:
    """Wait until the requeued job is pending again, then add `nodes` to its ExcNodeList."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
        if fields.get("JobState") == "PENDING":
            before = [n for n in fields.get("ExcNodeList", "(null)").split(",") if n and n != "(null)"]
            merged = ",".join(dict.fromkeys([*before, *nodes]))
            done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={merged}"],
                                  capture_output=True, text=True)
            print(f"[tunefleet] job {job_id}: ExcNodeList={merged}" + (f" failed: {done.stderr.strip()}"
                                                                      if done.returncode else ""), flush=True)
            return done.returncode
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            print(f"[tunefleet] job {job_id} is {fields['JobState']}: nothing to exclude", flush=True)
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
