"""Graceful stop on SIGTERM/SIGUSR1, what Slurm sends before preemption or the time limit.

The handler only records the signal. After each optimizer step the ranks agree (one tiny
all-reduce) whether any of them was signalled; then every rank has finished the same step,
a checkpoint is written, and the process exits with PREEMPTED_EXIT_CODE so that a scheduler
(or the sbatch script) can requeue the job, which resumes with train.resume=auto.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint is written; entry points exit with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def any_rank_stopping(self, accelerator) -> bool:
        import torch

        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
