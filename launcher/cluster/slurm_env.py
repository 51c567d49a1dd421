"""The Slurm job this process runs in, read from its environment in one place.

Everything the launcher needs from Slurm comes through `SlurmJob.from_environ()`: the job id, this
node's index within the step, the node list (expanded with `scontrol show hostnames`, the one
form every Slurm version understands), the restart count. Nothing else reads `$SLURM_*`, so no
value is ever taken from the batch shell where a per-node value was meant (the classic mistake
of an unescaped `$SLURM_NODEID` that makes every node rank 0).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping

from launcher.errors import UserError

# Rendezvous ports are chosen at run time on the head node (launcher.cluster.rendezvous_port); this
# one, derived from the job id, serves a node launcher started by hand without the batch process.
PORT_BASE, PORT_SPAN = 20000, 12000
PORT_ENV = "TUNEFLEET_RDZV_PORT"  # the port the batch process picked on the head node
EXPECTED_GPUS_ENV = "TUNEFLEET_GPUS_PER_NODE"  # the GPUs the head node was given: every node must match


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    node_id: int  # this node's index in the allocation (valid inside a job step)
    hosts: tuple[str, ...]
    restart_count: int
    array_job_id: int | None = None  # set for a task of a job array
    array_task_id: int | None = None

    @property
    def self_id(self) -> str:
        """The id that addresses this job and nothing else, for everything the job does to itself.

        In a job array one task has SLURM_JOB_ID == SLURM_ARRAY_JOB_ID, and `scontrol requeue`,
        `scontrol show job` or `squeue -j` given that bare id act on every task of the array;
        ARRAYJOBID_TASKID is this task alone."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return str(self.job_id)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def head(self) -> str:
        """The node that hosts the rendezvous: the first of the allocation."""
        return self.hosts[0]

    def port(self, environ: Mapping[str, str] | None = None) -> int:
        """The rendezvous port the batch process chose on the head node; derived from the job id where
        no batch process chose one (a node launcher started by hand)."""
        chosen = (os.environ if environ is None else environ).get(PORT_ENV, "")
        return int(chosen) if chosen.isdigit() else rendezvous_port(self.job_id)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "SlurmJob":
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" not in env:
            raise UserError("not inside a Slurm job (SLURM_JOB_ID is unset): submit with `tunefleet submit` or sbatch")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        array = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return cls(job_id=int(env["SLURM_JOB_ID"]), node_id=int(env.get("SLURM_NODEID", "0")),
                   hosts=tuple(expand_nodelist(nodelist)), restart_count=int(env.get("SLURM_RESTART_COUNT", "0")),
                   array_job_id=int(array[0]) if array[0] else None, array_task_id=int(array[1]) if array[1] else None)


def rendezvous_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[1-2],gpu7` -> ['node1', 'node2', 'gpu7'], by Slurm itself."""
    if not nodelist:
        raise UserError("SLURM_JOB_NODELIST is empty: cannot find the head node")
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.split():
        raise UserError(f"scontrol show hostnames {nodelist} failed: {done.stderr.strip()}")
    return done.stdout.split()


def allocated_cpus_per_node(environ: Mapping[str, str]) -> int | None:
    """The CPUs each node's one task may have: --cpus-per-task if the job was given it, else the fewest
    any node of the allocation has (SLURM_JOB_CPUS_PER_NODE, e.g. `72(x2),36`). None: not said."""
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        return int(per_task)
    counts = [int(part.split("(")[0]) for part in environ.get("SLURM_JOB_CPUS_PER_NODE", "").split(",")
              if part.split("(")[0].isdigit()]
    return min(counts) if counts else None


def gpus_on_node(environ: Mapping[str, str]) -> int | None:
    """The GPUs Slurm gave this node: SLURM_GPUS_ON_NODE, else the devices CUDA_VISIBLE_DEVICES lists.
    None where neither is set (a site that hands out whole nodes without GPU scheduling)."""
    on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit():
        return int(on_node)
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = environ["CUDA_VISIBLE_DEVICES"].strip()
        return 0 if visible in ("", "-1", "NoDevFiles") else len(visible.split(","))
    return None
