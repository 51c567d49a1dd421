"""One node's share of a Slurm job: start this node's training processes.

    srun --ntasks-per-node=1 python -m launcher.cluster.node recipe=lora ...   (run by launcher.cluster.job)

Runs once per node inside the job step, so SLURM_NODEID is this node's own index. The node joins
the run as machine `SLURM_NODEID` of `SLURM_NNODES`, with the first node of the allocation as the
rendezvous host and the port the batch process picked there (static ranks: no arrival-order
surprises). Processes per node follow the GPUs Slurm gave the node; a node whose GPUs differ from
the head's, or that was given GPUs CUDA cannot see, stops the run at once with the node named,
rather than training on CPU with gloo beside nodes on NCCL. Threads follow the CPUs the node's
task was given (launcher.distributed.cpus).

A stop request reaches rank 0 as a file (launcher.cluster.job); Slurm's own SIGTERM (time limit,
scancel, preemption) reaches every process of the step, this one included: before training began
the run exits at once (nothing to save), afterwards the workers checkpoint. This process only waits.
"""

from __future__ import annotations

import os
import socket
import sys

from launcher.cluster.slurm_env import EXPECTED_GPUS_ENV, SlurmJob, gpus_on_node
from launcher.errors import NodeFault, UserError
from launcher.train.preemption import PREEMPTED_EXIT_CODE, StopAtOnceUntilTraining, StoppedBeforeTraining


def node_words(words: list[str], job: SlurmJob, processes: int | None = None) -> list[str]:
    """The recipe words plus where this node sits in the run (these win over the recipe's)."""
    layout = [f"distributed.num_processes={processes}"] if processes else []
    return [*words, *layout, f"distributed.num_machines={job.num_nodes}", f"distributed.machine_rank={job.node_id}",
            f"distributed.main_process_ip={job.head}", f"distributed.main_process_port={job.port()}"]


def gpu_processes(words: list[str], given: int | None, expected: int | None, cuda_devices: int | None,
                  node: str) -> int | None:
    """Processes per node from the GPUs Slurm gave this node (None: a CPU node, the recipe decides).

    `given`: what Slurm says this node has (None: the site does not schedule GPUs, count what CUDA
    sees); `expected`: what the head node was given; `cuda_devices`: what CUDA sees here (None: no CUDA)."""
    gpus = given if given is not None else (cuda_devices or 0)
    if expected is not None and gpus != expected:
        raise NodeFault(f"node {node} was given {gpus} GPU(s), the head node {expected}: a run needs the same "
                        "number on every node (ask with --gpus-per-node, or slurm.gpus_per_node)")
    if gpus == 0:
        return None
    if cuda_devices is None:
        raise NodeFault(f"node {node} was given {gpus} GPU(s) but CUDA is not available there (torch without CUDA, "
                        "or no driver): install a CUDA build of torch in the job's environment, or ask for no GPUs")
    if cuda_devices < gpus:
        raise NodeFault(f"node {node} was given {gpus} GPU(s) but CUDA sees {cuda_devices}")
    asked = [w.split("=", 1)[1] for w in words if w.startswith("distributed.num_processes=")]
    if asked and asked[-1] != str(gpus):
        raise UserError(f"distributed.num_processes={asked[-1]}, but node {node} was given {gpus} GPU(s): one "
                        f"process per GPU; drop distributed.num_processes or ask for {asked[-1]} GPU(s) per node")
    return gpus


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        with StopAtOnceUntilTraining():  # Slurm's SIGTERM while this still reads the recipe: exit 75 at once
            return _for_srun(_start(words, node))
    except StoppedBeforeTraining:
        print(f"[tunefleet] node {os.environ.get('SLURM_NODEID', '?')}: stopped before training began, for a requeue",
              flush=True)
        return 0
    except UserError as err:
        print(f"error (node {node}): {err}", file=sys.stderr)
        return err.exit_code


def _start(words: list[str], node: str) -> int:
    job = SlurmJob.from_environ()
    import torch

    expected = os.environ.get(EXPECTED_GPUS_ENV, "")
    processes = gpu_processes(words, gpus_on_node(os.environ), int(expected) if expected.isdigit() else None,
                              torch.cuda.device_count() if torch.cuda.is_available() else None, node)
    words = node_words(words, job, processes)
    from launcher.config.load import load_recipe

    _, recipe = load_recipe(words)
    print(f"[tunefleet] node {job.node_id} of {job.num_nodes} ({node}, job {job.self_id}, "
          f"restart {job.restart_count}): rendezvous at {job.head}:{job.port()}, "
          f"{recipe.distributed.num_processes} process(es) on {processes or 0} GPU(s)", flush=True)
    if recipe.distributed.world_size == 1:
        from launcher import run

        return run.main(words)  # one process in all: it trains here and takes Slurm's signals itself
    from launcher.cli import run_workers, shell_command
    from launcher.launch import accelerate_command

    argv_cmd, extra_env = accelerate_command(recipe, words, has_gpu=processes is not None, environ=os.environ)
    if job.node_id == 0:
        print("[tunefleet] launching on each node: " + shell_command(argv_cmd, extra_env), flush=True)
    # Slurm signals every process of the step itself, the agent included: nothing to relay.
    return run_workers(argv_cmd, {**os.environ, **extra_env}, relay_stop_signals=False)


def _for_srun(code: int) -> int:
    """A checkpoint written on a stop is a success for srun: with --kill-on-bad-exit, a 75 from the
    first node to finish would kill the others while they still write theirs. The batch process
    reads the run's status.json to requeue (launcher.cluster.job)."""
    if code == PREEMPTED_EXIT_CODE:
        print(f"[tunefleet] node {os.environ.get('SLURM_NODEID', '?')}: stopped for a requeue", flush=True)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
