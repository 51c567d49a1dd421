"""The batch script's share of a Slurm job: run the training step, relay stop signals, requeue.

    exec python -m launcher.cluster.job recipe=lora ...   (the last line of slurm/*.sbatch)

Why Python and not bash: a bash `trap` does not run while a foreground child runs, and getting
`srun ... & wait` right (wait returns early on every trapped signal) is where hand-written scripts
go wrong. Here:

1. The job runs one task per node: `srun --ntasks-per-node=1 python -m launcher.cluster.node WORDS`.
2. Slurm's warning before the time limit (`--signal=B:USR1@SECONDS`: B: makes it reach this
   process only) or a SIGTERM is relayed to the step's task on every node as SIGTERM (by
   `scancel --signal`: srun itself would terminate the step);
   torchrun's agent forwards SIGTERM (not SIGUSR1, whose default action would kill it) to the
   workers, which finish their step, checkpoint and exit 75. torchrun SIGKILLs workers 30 s after
   SIGTERM, so one step plus one checkpoint must fit in 30 s; the warning must come early enough for
   that (see slurm/README.md).
3. A checkpoint written on a stop signal (every node's launcher exits 0 and the run's status.json
   says interrupted) requeues the job with `scontrol requeue`, at most
   TUNEFLEET_MAX_RESTARTS times; the requeued job continues with train.resume=auto. Any other failure
   ends the job with that status: it is not requeued. Nor is a cancelled job: `scancel`,
   `tunefleet cancel` or a search pruning a trial sends the same SIGTERM as a warning would, and
   requeueing would undo the cancel. Slurm shows such a job COMPLETING; a warned job (`--signal`,
   `scancel --signal`) is still RUNNING when it has checkpointed, and one that reached its time
   limit is COMPLETING with Reason=TimeLimit: both are requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.cluster.job_settings import JobSettings, load_job_settings
from launcher.cluster.slurm_env import SlurmJob
from launcher.errors import UserError
from launcher.train.preemption import PREEMPTED_EXIT_CODE

RELAYED = (signal.SIGUSR1, signal.SIGTERM)


def step_command(words: list[str], job: SlurmJob, settings: JobSettings = JobSettings()) -> list[str]:
    return ["srun", "--kill-on-bad-exit=1", f"--nodes={job.num_nodes}", "--ntasks-per-node=1",
            *settings.srun_options(), *settings.command_prefix(),
            sys.executable, "-m", "launcher.cluster.node", *words]


def fixed_run_folder(words: list[str], job: SlurmJob) -> tuple[list[str], Path]:
    """The words with the run folder fixed, and that folder. A requeued job must find its own run:
    a {time} folder is named after the job id instead."""
    from launcher.config.load import load_recipe

    name, recipe = load_recipe([*words, f"distributed.main_process_ip={job.head}"])  # as each node will see it
    template = recipe.output.dir
    if "{time}" not in template:
        return words, Path(template.replace("{recipe}", name))
    folder = template.replace("{time}", f"job{job.job_id}").replace("{recipe}", name)
    return [*words, f"output.dir={folder}"], Path(folder)


def stopped_for_requeue(code: int, run_dir: Path) -> bool:
    """Whether the step ended because every rank checkpointed on a stop signal.

    Each node's launcher exits 0 then (launcher.cluster.node), not 75: srun's --kill-on-bad-exit
    would otherwise kill the nodes still finishing their checkpoint as soon as the first one exits.
    The run's own status.json says what happened."""
    from launcher.outputs.status import read_status

    return code == PREEMPTED_EXIT_CODE or (code == 0 and read_status(run_dir).get("state") == "interrupted")


def cancelled(job_id) -> bool:
    """Whether Slurm is ending the job for a reason other than its time limit (scancel, a preemption
    that cancels). While the batch process still runs, such a job shows COMPLETING, not CANCELLED;
    one that reached its time limit shows COMPLETING with Reason=TimeLimit and is worth a requeue.
    If Slurm does not answer, the job counts as not cancelled: requeue as before."""
    from launcher.cluster.slurm_executor import job_details

    details = job_details(str(job_id))
    return details.get("state") in ("completing", "cancelled") and details.get("reason") != "TimeLimit"


def sweep_task_words(words: list[str], environ=os.environ) -> list[str]:
    """For a task of a sweep's job array: its run's words from the manifest, and its output from
    now on appended to the run's own log (one folder per run, across requeues)."""
    from launcher.cluster.submit import SWEEP_TASK_FLAG
    from launcher.cluster.sweep import read_manifest

    if SWEEP_TASK_FLAG not in words:
        return words
    at = words.index(SWEEP_TASK_FLAG)
    sweep_dir = Path(words[at + 1])
    run = read_manifest(sweep_dir)["runs"][int(environ["SLURM_ARRAY_TASK_ID"])]
    log = Path(run["run_dir"]) / "slurm" / f"slurm-{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)  # the training step inherits these: its output lands in the run's folder too
    os.dup2(fd, 2)
    os.close(fd)
    return [*words[:at], *run["words"], *words[at + 2:]]


def signal_step(job: SlurmJob, step: subprocess.Popen) -> None:
    """SIGTERM to the training step's task on every node, through Slurm.

    Not to srun itself: srun answers a SIGTERM by terminating the step, and its tasks die
    (status 137) before they can checkpoint. `scancel --signal` delivers the signal and nothing more.
    """
    listed = subprocess.run(["squeue", "-h", "-s", "-j", str(job.job_id), "-o", "%i"], capture_output=True, text=True)
    steps = [s for s in listed.stdout.split() if s.partition(".")[2].isdigit()]
    if steps:
        subprocess.run(["scancel", "--signal=TERM", *steps], capture_output=True, text=True)
    else:
        step.send_signal(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        job = SlurmJob.from_environ()
        settings = load_job_settings()
        words, run_dir = fixed_run_folder(sweep_task_words(words), job)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    max_restarts = int(os.environ.get("TUNEFLEET_MAX_RESTARTS", "3"))
    print(f"[tunefleet] job {job.job_id} on {job.num_nodes} node(s) {','.join(job.hosts)}, "
          f"restart {job.restart_count} of at most {max_restarts}", flush=True)
    step = subprocess.Popen(step_command(words, job, settings), env={**os.environ, **settings.env})

    def relay(signum, _frame) -> None:
        print(f"[tunefleet] {signal.Signals(signum).name}: asking every rank to finish its step, write a checkpoint "
              "and stop", flush=True)
        signal_step(job, step)

    for sig in RELAYED:
        signal.signal(sig, relay)
    code = step.wait()
    if not stopped_for_requeue(code, run_dir):
        print(f"[tunefleet] training step ended with status {code}", flush=True)
        return code
    code = PREEMPTED_EXIT_CODE
    if cancelled(job.job_id):
        print(f"[tunefleet] checkpoint written; job {job.job_id} was cancelled, so it is not requeued; submit it "
              "again to continue (train.resume=auto)", flush=True)
        return code
    if job.restart_count >= max_restarts:
        print(f"[tunefleet] checkpoint written, but the job has been requeued {job.restart_count} times already "
              f"(TUNEFLEET_MAX_RESTARTS={max_restarts}): not requeueing; resubmit to continue", flush=True)
        return code
    print(f"[tunefleet] checkpoint written: requeueing job {job.job_id} (restart {job.restart_count + 1}); "
          "it continues with train.resume=auto", flush=True)
    done = subprocess.run(["scontrol", "requeue", str(job.job_id)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: scontrol requeue failed: {done.stderr.strip()}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
