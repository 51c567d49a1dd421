"""The run's heartbeat for the hang watchdog of a Slurm job (launcher.cluster.watchdog).

Rank 0 writes what the run is doing to the file TUNEFLEET_HEARTBEAT_FILE names (RUN/slurm/heartbeat,
set by launcher.cluster.job): `training` after every step, and `evaluating`, `checkpointing` or
`finishing` before the parts that may rightly take long without a step (an evaluation with sample
answers, a large checkpoint, the final save and merge). The watchdog ends a run only while it says
`training` and has not beaten for the set time. Without the variable (every run outside a Slurm
job) nothing is written.
"""

from __future__ import annotations

import os

HEARTBEAT_ENV = "TUNEFLEET_HEARTBEAT_FILE"
TRAINING = "training"


class Heartbeat:
    def __init__(self, is_main: bool):
        self.path = os.environ.get(HEARTBEAT_ENV) if is_main else None
        self.phase: str | None = None

    def beat(self, phase: str = TRAINING) -> None:
        if not self.path:
            return
        try:
            if phase != self.phase:
                with open(self.path, "w") as f:
                    f.write(phase + "\n")
                self.phase = phase
            else:
                os.utime(self.path)  # one metadata update per step on rank 0
        except OSError:
            pass  # a heartbeat that cannot be written must never stop training


_this_process = Heartbeat(is_main=False)


def start(is_main: bool) -> None:
    """From now on this process beats (rank 0 inside a Slurm job); called when training begins."""
    global _this_process
    _this_process = Heartbeat(is_main)
    _this_process.beat(TRAINING)


def beat(phase: str = TRAINING) -> None:
    _this_process.beat(phase)
