"""How a search's trials run: as processes of the driver on this machine, or as Slurm jobs.

Both answer the driver's questions the same way: `refresh(records)` once per poll (for Slurm, one
squeue for every trial in flight; it raises SchedulerDidNotAnswer when squeue fails, which is not
"the job ended"), then `ended(record)` from that answer; `start`, `stop` and `wait`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from launcher.cluster.executor import JobView, SchedulerDidNotAnswer
from launcher.cluster.local_executor import start_run
from launcher.distributed.lifetime import alive

POLL_S = 1.0
STOP_WAIT_S = 120.0


class LocalTrials:
    """Trials as `tunefleet run` processes of the driver (it reads their exit codes)."""

    def __init__(self, _words: list[str]):
        self.children: dict[int, subprocess.Popen] = {}

    def start(self, record: dict) -> None:
        child = start_run(record["words"], record["run_dir"])
        self.children[child.pid] = child
        record.update(pid=child.pid, job_id=record["name"])

    def refresh(self, records: list[dict]) -> None:
        """Nothing to ask: the driver sees its own processes."""

    def ended(self, record: dict) -> bool:
        child = self.children.get(record.get("pid"))
        if child is not None:
            return child.poll() is not None  # reaps it
        return not alive(record.get("pid") or 0)  # started by an earlier driver

    def stop(self, record: dict) -> None:
        if not self.ended(record):
            os.kill(record["pid"], signal.SIGTERM)  # the run checkpoints and exits

    def wait(self, record: dict) -> None:
        child = self.children.get(record.get("pid"))
        if child is not None:
            child.wait()


class SlurmTrials:
    """Trials as single-run Slurm jobs, submitted as `tunefleet submit` would with the search's
    cluster= and slurm.* words; a trial started again resubmits its own batch script."""

    def __init__(self, words: list[str]):
        self.words = words
        self.views: dict[str, JobView] = {}  # the last answer
        self.asked: set[str] = set()  # the jobs it answered for

    def start(self, record: dict) -> None:
        from launcher.cluster import submit

        # A trial started again is submitted again with the same words: under the folder's claim, refused
        # while a job of it still pends or runs (an sbatch that timed out may have created one), and
        # continued from its checkpoint (train.resume=auto) otherwise.
        job = submit.submit(submit.plan([*record["words"], *self.words]))
        record.update(job_id=job, pid=None)

    def refresh(self, records: list[dict]) -> None:
        """One squeue for every trial given (raises SchedulerDidNotAnswer: then nothing is known)."""
        from launcher.cluster import slurm_executor

        self.views = slurm_executor.jobs({"runs": records})
        self.asked = {str(r.get("job_id")) for r in records}

    def ended(self, record: dict) -> bool:
        """Whether the job left the queue, as of the last refresh: Slurm lists it in a final state, or no
        longer at all (it answered, and forgot the job). A job submitted since is not ended."""
        job = str(record.get("job_id"))
        if job not in self.asked:
            return False
        view = self.views.get(job)
        return view is None or not view.live

    def stop(self, record: dict) -> None:
        from launcher.cluster import slurm_executor

        slurm_executor.cancel({}, [record["job_id"]])  # SIGTERM: the run checkpoints; a cancelled job is not requeued

    def wait(self, record: dict) -> None:
        deadline = time.time() + STOP_WAIT_S
        while time.time() < deadline:
            try:
                self.refresh([record])
                if self.ended(record):
                    return
            except SchedulerDidNotAnswer:
                pass  # ask again until the deadline
            time.sleep(POLL_S)


EXECUTORS = {"local": LocalTrials, "slurm": SlurmTrials}
