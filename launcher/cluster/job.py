"""The batch script's share of a Slurm job: run the training step, pass on stop requests, requeue.

    exec python -m launcher.cluster.job recipe=lora ...   (the last line of slurm/*.sbatch)

Why Python and not bash: a bash `trap` does not run while a foreground child runs, and getting
`srun ... & wait` right (wait returns early on every trapped signal) is where hand-written scripts
go wrong. Here:

1. The job runs one task per node: `srun --ntasks-per-node=1 --cpus-per-task=N python -m
   launcher.cluster.node WORDS`, N the CPUs the allocation gives each node (from Slurm 22.05 srun
   does not take sbatch's --cpus-per-task; with a site's core binding the task would get one core).
   The batch process runs on the allocation's first node, the rendezvous host: it picks a port that
   is free there now and hands it to every node (TUNEFLEET_RDZV_PORT).
2. Slurm's warning before the time limit (`--signal=B:USR1@SECONDS`, to this process only) becomes
   a stop request: a file in the run folder (RUN/slurm/stop-request) that rank 0 reads at every step
   boundary; the ranks agree, finish the step, checkpoint and exit 75. No signal reaches torchrun's
   agent, so its 30 s SIGTERM-to-SIGKILL grace is not the clock: the checkpoint has the whole
   warning (`signal_seconds`). A SIGTERM to this process is never relayed: Slurm sends its own
   SIGTERM to every step with it (time limit, scancel, preemption), and a second one to the agent
   crashes it; it is noted, and the request file written as well (it costs nothing).
3. A checkpoint written on a stop (every node's launcher exits 0 and the run's status.json says
   interrupted), or a stop that came before training began (nothing to save), requeues the job with
   `scontrol requeue`, at most TUNEFLEET_MAX_RESTARTS times; the requeued job continues with
   train.resume=auto. Any other failure ends the job with that status: it is not requeued. Nor is a
   cancelled job: `scancel`, `tunefleet cancel` or a search pruning a trial ends it with SIGTERM, and
   requeueing would undo the cancel. Slurm shows such a job COMPLETING; a warned job is still
   RUNNING when it has checkpointed, and one that reached its time limit is COMPLETING with
   Reason=TimeLimit: both are requeued.
4. A step that failed for a reason not the recipe's (NCCL, GPU, network or node failure in its
   output; launcher.cluster.retry) is requeued up to `retries` times without the node it failed on,
   and a step that shows no new step for `hang_seconds` is killed and retried the same way
   (launcher.cluster.watchdog). A user error is never retried.
5. In a job array everything the job does to itself (requeue, looking itself up) addresses
   ARRAYJOBID_TASKID: the bare SLURM_JOB_ID of one task is also the array's id and would act on
   every task.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.cluster.job_settings import JobSettings, load_job_settings
from launcher.cluster.retry import (RETRIES_FILE, InfrastructureFailure, JobLog, diagnose, exclusion_command,
                                    nodes_to_exclude, past_retries, record_retry)
from launcher.cluster.slurm_env import (EXPECTED_GPUS_ENV, PORT_ENV, SlurmJob, allocated_cpus_per_node,
                                        gpus_on_node)
from launcher.cluster.watchdog import HEARTBEAT, kill_step_of, wait_for_step
from launcher.distributed.rendezvous import pick_rendezvous_port
from launcher.errors import UserError
from launcher.train.heartbeat import HEARTBEAT_ENV
from launcher.train.preemption import PREEMPTED_EXIT_CODE, STOP_FILE_ENV, STOP_REQUEST


def step_command(words: list[str], job: SlurmJob, settings: JobSettings = JobSettings(),
                 cpus_per_node: int | None = None) -> list[str]:
    """The training step. `--cpus-per-task` hands the node's whole share of the allocation to its one
    task. Binding is left to the site's task plugin: with --cpus-per-task set, task/affinity and
    task/cgroup confine the task to exactly those cores, which is the policy wanted; an explicit
    --cpu-bind would print an error line on every cluster without binding support."""
    cpus = [f"--cpus-per-task={cpus_per_node}"] if cpus_per_node else []
    return ["srun", "--kill-on-bad-exit=1", f"--nodes={job.num_nodes}", "--ntasks-per-node=1", *cpus,
            *settings.srun_options(), *settings.command_prefix(),
            settings.python(sys.executable), "-m", "launcher.cluster.node", *words]


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


def stopped_for_requeue(code: int, run_dir: Path, stop_requested: bool) -> bool:
    """Whether the step ended because the run stopped on a stop request, to be continued.

    Each node's launcher exits 0 then (launcher.cluster.node), not 75: srun's --kill-on-bad-exit
    would otherwise kill the nodes still finishing their checkpoint as soon as the first one exits.
    The run's own status.json says it was interrupted; a stop that came before training began left
    no status of its own, so a stop this process saw, with the run not finished, counts too."""
    from launcher.outputs.run_files import read_status

    if code not in (0, PREEMPTED_EXIT_CODE):
        return False
    state = read_status(run_dir).state
    return state == "interrupted" or code == PREEMPTED_EXIT_CODE or (stop_requested and state != "finished")


def cancelled(job_id: str) -> bool:
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
    from launcher.outputs.run_files import read_manifest

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


class StopRequests:
    """Stop signals to this process, turned into the run's stop-request file (launcher.train.preemption
    reads it at each step boundary). Installed first thing: USR1's default action would kill this
    process, and with it the job, while it still reads the recipe."""

    def __init__(self):
        self.received: str | None = None
        self.file: Path | None = None

    def install(self) -> "StopRequests":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def arm(self, file: Path) -> None:
        """Where the request goes; one left over from an earlier attempt of the job is removed."""
        file.parent.mkdir(parents=True, exist_ok=True)
        if self.received is None:
            file.unlink(missing_ok=True)
        self.file = file
        self._write()

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"[tunefleet] {name}: asking every rank to finish its step, write a checkpoint and stop"
                  + (" (Slurm sends SIGTERM to the step itself)" if signum == signal.SIGTERM else ""), flush=True)
        self._write()

    def _write(self) -> None:
        if self.file is not None and self.received is not None:
            self.file.write_text(f"{self.received}\n")


def step_environment(job: SlurmJob, settings: JobSettings, run_dir: Path, environ=os.environ) -> dict[str, str]:
    """The training step's environment: the job's settings, where to look for a stop request and to
    beat the heartbeat, the rendezvous port chosen here on the head node, and the GPUs each node
    should have."""
    env = {**environ, **settings.env, STOP_FILE_ENV: str(run_dir / "slurm" / STOP_REQUEST),
           HEARTBEAT_ENV: str(run_dir / "slurm" / HEARTBEAT)}
    if environ.get("SLURMD_NODENAME", job.head) == job.head:  # Slurm runs the batch script on the first node
        try:
            env[PORT_ENV] = str(pick_rendezvous_port(job.job_id))
        except OSError as err:  # each node then derives the port from the job id, as by hand
            print(f"[tunefleet] {err}: the rendezvous uses port {job.port({})}", flush=True)
    gpus = gpus_on_node(environ)
    if gpus is not None:
        env[EXPECTED_GPUS_ENV] = str(gpus)
    return env


def main(argv: list[str] | None = None) -> int:
    stops = StopRequests().install()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        job = SlurmJob.from_environ()
        settings = load_job_settings()
        words, run_dir = fixed_run_folder(sweep_task_words(words), job)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    max_restarts = int(os.environ.get("TUNEFLEET_MAX_RESTARTS", "3"))
    print(f"[tunefleet] job {job.self_id} on {job.num_nodes} node(s) {','.join(job.hosts)}, "
          f"restart {job.restart_count} of at most {max_restarts}", flush=True)
    stop_file = run_dir / "slurm" / STOP_REQUEST
    stops.arm(stop_file)
    log = JobLog.here()
    step = subprocess.Popen(step_command(words, job, settings, allocated_cpus_per_node(os.environ)),
                            env=step_environment(job, settings, run_dir))
    code, idle = wait_for_step(step, run_dir, settings.hang_seconds, lambda: kill_step_of(job.self_id, step))
    if idle is None and stopped_for_requeue(code, run_dir, stops.received is not None):
        stop_file.unlink(missing_ok=True)
        return requeue_after_stop(job, max_restarts, len(past_retries(run_dir, job.self_id)))
    failure = (InfrastructureFailure("hang", f"no new step for {idle:.0f} s (slurm.hang_minutes)", ())
               if idle is not None else diagnose(log.since(), code))
    if failure is None:
        print(f"[tunefleet] training step ended with status {code}", flush=True)
        return code
    return retry_after_failure(job, run_dir, settings, failure, code or 1)


def requeue_after_stop(job: SlurmJob, max_restarts: int, retries: int) -> int:
    """Requeue a job that stopped on a stop request, at most `max_restarts` times (requeues for
    infrastructure failures, `retries`, have their own budget)."""
    code = PREEMPTED_EXIT_CODE
    stops = job.restart_count - retries
    if cancelled(job.self_id):
        print(f"[tunefleet] checkpoint written; job {job.self_id} was cancelled, so it is not requeued; submit it "
              "again to continue (train.resume=auto)", flush=True)
        return code
    if stops >= max_restarts:
        print(f"[tunefleet] checkpoint written, but the job has been requeued {stops} times already "
              f"(TUNEFLEET_MAX_RESTARTS={max_restarts}): not requeueing; resubmit to continue", flush=True)
        return code
    print(f"[tunefleet] stopped for a requeue: requeueing job {job.self_id} (restart {job.restart_count + 1}); "
          "it continues with train.resume=auto", flush=True)
    return 0 if requeue(job) else code


def retry_after_failure(job: SlurmJob, run_dir: Path, settings: JobSettings, failure: InfrastructureFailure,
                        code: int) -> int:
    where = f" on {', '.join(failure.nodes)}" if failure.nodes else ""
    print(f"[tunefleet] {failure.kind}{where}, not the recipe's: {failure.evidence}", flush=True)
    spent = len(past_retries(run_dir, job.self_id))
    if cancelled(job.self_id):
        print(f"[tunefleet] job {job.self_id} was cancelled: not retried", flush=True)
        return code
    if spent >= settings.retries:
        print(f"[tunefleet] not retried: slurm.retries={settings.retries}, {spent} spent; see RUN/slurm/{RETRIES_FILE}",
              flush=True)
        return code
    record_retry(run_dir, job.self_id, job.restart_count, failure)
    exclude, why_not = nodes_to_exclude(job.self_id, failure.nodes, job.num_nodes)
    if why_not:
        print(f"[tunefleet] {', '.join(failure.nodes)} stays eligible: {why_not}", flush=True)
    if exclude:  # submitted first: the requeue ends this process
        done = subprocess.run(exclusion_command(job.self_id, tuple(exclude), run_dir), capture_output=True, text=True)
        print(f"[tunefleet] the next attempt runs without {', '.join(exclude)}" if done.returncode == 0 else
              f"[tunefleet] could not exclude {', '.join(exclude)}: {done.stderr.strip()}", flush=True)
    print(f"[tunefleet] retry {spent + 1} of {settings.retries}: requeueing job {job.self_id}; it continues with "
          "train.resume=auto", flush=True)
    return 0 if requeue(job) else code


def requeue(job: SlurmJob) -> bool:
    done = subprocess.run(["scontrol", "requeue", job.self_id], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: scontrol requeue failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
