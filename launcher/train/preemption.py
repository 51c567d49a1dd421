"""Graceful stop on SIGTERM/SIGUSR1 or a stop-request file: what precedes preemption or a time limit.

The handler only records the signal. After each optimizer step the ranks agree (one tiny
all-reduce) whether any of them was signalled; then every rank has finished the same step,
a checkpoint is written, and the process exits with PREEMPTED_EXIT_CODE so that a scheduler
(or the sbatch script) can requeue the job, which resumes with train.resume=auto.

Inside a Slurm job the warning before the time limit arrives as a file instead
(launcher.cluster.job writes it; TUNEFLEET_STOP_FILE names it), which rank 0 reads at the same
point. A signal would have to pass torchrun's agent, which SIGKILLs its workers 30 s after a
SIGTERM however long their checkpoint takes; a file leaves the checkpoint the whole warning.
"""

from __future__ import annotations

import os
import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE_ENV = "TUNEFLEET_STOP_FILE"
STOP_REQUEST = "stop-request"  # the file's name in RUN/slurm/


class Preempted(Exception):
    """Raised after the checkpoint is written; entry points exit with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None

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

        # Rank 0 alone looks (one stat per step, not one per rank on a shared file system); the
        # all-reduce below tells the others.
        if self.signal_name is None and self.stop_file and accelerator.is_main_process and \
                os.path.exists(self.stop_file):
            self.signal_name = "stop request (" + (_read(self.stop_file) or "from the batch process") + ")"
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _read(path: str) -> str:
    try:
        return open(path).read().strip()
    except OSError:
        return ""


class StoppedBeforeTraining(BaseException):
    """A stop signal came before training began: nothing to checkpoint, the process exits at once.

    A BaseException (like KeyboardInterrupt), because it is raised wherever the signal lands, and
    library code that catches Exception while loading must not swallow it."""

    exit_code = PREEMPTED_EXIT_CODE


class StopAtOnceUntilTraining:
    """While the run prepares (rendezvous, model load, tokenizing), a stop signal ends it at once.

    Recording the signal until the first step could take minutes, and a scheduler kills what
    outlives its grace period (torchrun after 30 s) with a SIGKILL that reads as a failure, so a
    preempted job would not be requeued. Exiting 75 at once lets it be requeued; with nothing
    trained there is nothing to save. The training loop disarms it when its own StopFlag takes over.
    """

    armed = False
    POLL_S = 1.0

    def __enter__(self) -> "StopAtOnceUntilTraining":
        StopAtOnceUntilTraining.armed = True  # before the handlers: a signal in between must not be lost
        self._previous = {sig: signal.signal(sig, self._stop) for sig in STOP_SIGNALS}
        stop_file = os.environ.get(STOP_FILE_ENV)
        if stop_file:
            import threading

            self._watching = threading.Event()
            threading.Thread(target=self._watch, args=(stop_file, self._watching), daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        StopAtOnceUntilTraining.armed = False
        if getattr(self, "_watching", None) is not None:
            self._watching.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @classmethod
    def _watch(cls, stop_file: str, done) -> None:
        """A stop request (launcher.cluster.job) that comes while the run loads is a signal to this process:
        every rank reads the file (no collective exists yet) and exits at once, as on Slurm's SIGTERM."""
        while not done.wait(cls.POLL_S):
            if not cls.armed:
                return
            if os.path.exists(stop_file):
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    @staticmethod
    def _stop(signum, _frame) -> None:
        # Disarmed: the training loop took over; once it has finished (run written, status final) a
        # stop signal is ignored while the process tears down and exits, and should teardown hang,
        # the launcher's SIGKILL after its grace period still ends it.
        if StopAtOnceUntilTraining.armed:
            StopAtOnceUntilTraining.armed = False
            raise StoppedBeforeTraining(signal.Signals(signum).name)


def training_started() -> None:
    StopAtOnceUntilTraining.armed = False
