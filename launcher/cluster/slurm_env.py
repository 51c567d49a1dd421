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

# Rendezvous ports are derived from the job id, so concurrent jobs sharing a node do not collide.
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    node_id: int  # this node's index in the allocation (valid inside a job step)
    hosts: tuple[str, ...]
    restart_count: int

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def head(self) -> str:
        """The node that hosts the rendezvous: the first of the allocation."""
        return self.hosts[0]

    @property
    def port(self) -> int:
        return rendezvous_port(self.job_id)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "SlurmJob":
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" not in env:
            raise UserError("not inside a Slurm job (SLURM_JOB_ID is unset): submit with `tunefleet submit` or sbatch")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        return cls(job_id=int(env["SLURM_JOB_ID"]), node_id=int(env.get("SLURM_NODEID", "0")),
                   hosts=tuple(expand_nodelist(nodelist)), restart_count=int(env.get("SLURM_RESTART_COUNT", "0")))


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
