"""One node's share of a Slurm job: start this node's training processes.

    srun --ntasks-per-node=1 python -m launcher.cluster.node recipe=lora ...   (run by launcher.cluster.job)

Runs once per node inside the job step, so SLURM_NODEID is this node's own index. The node joins
the run as machine `SLURM_NODEID` of `SLURM_NNODES`, with the first node of the allocation as the
rendezvous host and a port derived from the job id (static ranks: no arrival-order surprises).
A stop reaches every process of the step from Slurm (`scancel --signal=TERM` on the step, or the
scheduler's own SIGTERM before preemption): the agent, which shuts its workers down, and the
workers, which finish their step, checkpoint and exit 75. This process only waits.
"""

from __future__ import annotations

import os
import socket
import sys

from launcher.cluster.slurm_env import SlurmJob
from launcher.errors import UserError
from launcher.train.preemption import PREEMPTED_EXIT_CODE


def node_words(words: list[str], job: SlurmJob) -> list[str]:
    """The recipe words plus where this node sits in the run (these win over the recipe's)."""
    return [*words, f"distributed.num_machines={job.num_nodes}", f"distributed.machine_rank={job.node_id}",
            f"distributed.main_process_ip={job.head}", f"distributed.main_process_port={job.port}"]


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        job = SlurmJob.from_environ()
        words = node_words(words, job)
        from launcher.config.load import load_recipe

        _, recipe = load_recipe(words)
        print(f"[tunefleet] node {job.node_id} of {job.num_nodes} ({socket.gethostname()}, job {job.job_id}, "
              f"restart {job.restart_count}): rendezvous at {job.head}:{job.port}", flush=True)
        if recipe.distributed.world_size == 1:
            from launcher import run

            return _for_srun(run.main(words))  # one process in all: it trains here and takes the stop signal itself
        import torch

        from launcher.cli import run_workers, shell_command
        from launcher.launch import accelerate_command

        argv_cmd, extra_env = accelerate_command(recipe, words, has_gpu=torch.cuda.is_available(), environ=os.environ)
        if job.node_id == 0:
            print("[tunefleet] launching on each node: " + shell_command(argv_cmd, extra_env), flush=True)
        # Slurm signals every process of the step itself (launcher.cluster.job): nothing to relay.
        return _for_srun(run_workers(argv_cmd, {**os.environ, **extra_env}, relay_stop_signals=False))
    except UserError as err:
        print(f"error (node {os.environ.get('SLURM_NODEID', '?')}): {err}", file=sys.stderr)
        return err.exit_code


def _for_srun(code: int) -> int:
    """A checkpoint written on a stop signal is a success for srun: with --kill-on-bad-exit, a 75 from
    the first node to finish would kill the others while they still write theirs. The batch process
    reads the run's status.json to requeue (launcher.cluster.job)."""
    if code == PREEMPTED_EXIT_CODE:
        print(f"[tunefleet] node {os.environ.get('SLURM_NODEID', '?')}: checkpoint written, stopped for a requeue",
              flush=True)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
