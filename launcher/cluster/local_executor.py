"""The local executor: a sweep's runs on this machine, N at a time, with the same manifest,
`status`, `cancel` and `collect` as on Slurm.

    tunefleet submit recipe=lora train.lr=1e-4,2e-4,4e-4 executor=local local.parallel=1

`submit` writes the manifest and starts a detached supervisor (this module) that outlives the
terminal: it starts each run as `tunefleet run WORDS` (output appended to RUN/local.log), keeps at
most `parallel` running, and records pids and states in the manifest, of which it is the only
writer while it lives. `tunefleet cancel` sends it SIGTERM: it passes SIGTERM to the runs (each
checkpoints and stops), marks what never started as cancelled, and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.cluster.executor import JobView
from launcher.cluster.sweep import write_manifest
from launcher.distributed.lifetime import alive
from launcher.outputs.run_files import read_manifest

POLL_S = 1.0
RUN_LOG = "local.log"


def start_logged(argv: list[str], log: Path, **popen) -> subprocess.Popen:
    """Start `argv` with its output appended to `log`. The child has its own copy of the file; the
    parent's is closed at once, or a supervisor or search driver would hold one per process it started."""
    with open(log, "a") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)


def start_run(words: list[str], run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tunefleet run WORDS` on this machine, its output appended to RUN/local.log (env: None inherits ours)."""
    return start_logged([sys.executable, "-m", "launcher.cli", "run", *words], Path(run_dir) / RUN_LOG, env=env)


def start_supervisor(sweep_dir: Path, parallel: int) -> int:
    argv = [sys.executable, "-m", "launcher.cluster.local_executor", str(sweep_dir), str(parallel)]
    return start_logged(argv, Path(sweep_dir) / "local-executor.log", start_new_session=True).pid


def running(pid: int | None) -> bool:
    return bool(pid) and alive(pid)


def jobs(manifest: dict) -> dict[str, JobView]:
    """The runs the supervisor has running or queued, in the form slurm_executor.jobs gives; a run
    it no longer lists has ended (the manifest and the run's status.json say how)."""
    supervisor = running(manifest.get("supervisor_pid"))
    views = {}
    for record in manifest["runs"]:
        job = record.get("job_id")
        if record.get("state") == "running" and running(record.get("pid")):
            views[job] = JobView(state="running", nodes=socket.gethostname())
        elif record.get("state") == "queued" and supervisor:
            views[job] = JobView(state="pending", reason="waiting for a free slot")
    return views


def supervise(sweep_dir: Path, parallel: int) -> int:
    manifest = read_manifest(sweep_dir)
    manifest["supervisor_pid"] = os.getpid()
    write_manifest(sweep_dir, manifest)
    running: dict[int, tuple[dict, subprocess.Popen]] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    queue = [r for r in manifest["runs"] if r.get("state") == "queued"]
    while queue or running:
        if stopping:
            for record, child in running.values():
                child.send_signal(signal.SIGTERM)  # each run checkpoints after its step and exits 75
            for record in queue:
                record["state"] = "cancelled"
            queue = []
            for record, child in running.values():
                child.wait()
                record["state"] = "cancelled"
            running = {}
            break
        while queue and len(running) < parallel:
            record = queue.pop(0)
            child = start_run(record["words"], record["run_dir"], env=share_of_cpus(parallel))
            record.update(state="running", pid=child.pid, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            running[child.pid] = (record, child)
            write_manifest(sweep_dir, manifest)
        for pid, (record, child) in list(running.items()):
            code = child.poll()
            if code is not None:
                record.update(state="finished" if code == 0 else "failed", exit_code=code)
                del running[pid]
                write_manifest(sweep_dir, manifest)
        time.sleep(POLL_S)
    write_manifest(sweep_dir, manifest)
    return 0


def submit(sweep_dir: Path, manifest: dict, parallel: int) -> None:
    for i, record in enumerate(manifest["runs"]):
        record.update(job_id=f"local-{i}", state="queued")
    write_manifest(sweep_dir, manifest)
    start_supervisor(sweep_dir, parallel)  # it records its own pid in the manifest


def cancel(manifest: dict, job_ids: list[str]) -> bool:
    """Stop the whole local sweep: its supervisor stops the runs and marks them cancelled itself."""
    if running(manifest.get("supervisor_pid")):
        os.kill(manifest["supervisor_pid"], signal.SIGTERM)
        return False  # the supervisor owns the manifest while it lives
    return True


def log_files(run_dir: Path) -> list[Path]:
    return [p for p in [Path(run_dir) / RUN_LOG] if p.is_file()]


def share_of_cpus(parallel: int, environ=os.environ) -> dict[str, str]:
    """A run's environment with its share of this machine's cores (launcher.distributed.cpus): runs
    training side by side each size their threads to it instead of each taking every core."""
    from launcher.distributed.cpus import CPU_BUDGET_ENV, cpu_budget

    return {**environ, CPU_BUDGET_ENV: str(max(1, cpu_budget(environ) // parallel))}


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2])))
