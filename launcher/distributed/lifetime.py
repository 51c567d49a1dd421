"""Tie the workers' lifetime to their launcher, so that no worker trains on unsupervised.

    tunefleet run (cli.run_workers) -> accelerate/torchrun agent -> workers (launcher/run.py)

When the CLI or the agent dies without a chance to clean up (SIGKILL, the OOM killer), Linux
re-parents its children to init and they would train on, each in its own session, writing into
a run nobody watches. Two mechanisms stop them, both ending in SIGTERM, which a worker turns into
its graceful stop (launcher/train/preemption.py: checkpoint after the step, exit 75):

- PR_SET_PDEATHSIG: the kernel signals a process when its parent dies. The CLI sets it on the
  agent (Popen preexec_fn), so the agent's own SIGTERM handling stops its workers; each worker sets
  it on itself at startup, so killing the agent stops the workers. It fires when the parent
  *thread* that forked the child exits; torch elastic forks workers from the agent's main thread
  (torch/distributed/elastic/multiprocessing/subprocess_handler), so that holds today.
- A watchdog thread in each worker polls its parent and the CLI (TUNEFLEET_LAUNCHER_PID). It
  closes what PDEATHSIG leaves open: a launcher that forks from a thread, systems without prctl,
  and an agent that died before its worker set PDEATHSIG (the CLI then exits, which the watchdog
  sees; under a bare `accelerate launch` that window, the worker's first second, stays open).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable

LAUNCHER_PID_ENV = "TUNEFLEET_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None off Linux. Looked up before any fork: a preexec_fn should only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies; False if unsupported."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def agent_preexec(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen preexec_fn for the agent: it gets `signum` when the launcher (this process) dies.

    Runs in the forked child before exec, so it only calls prctl (resolved here, in the parent) and
    os functions. If the launcher already died between fork and prctl, the child exits at once.
    """
    prctl, launcher = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != launcher:
            os._exit(1)

    return preexec


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ')'.
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def tie_worker_to_launcher(interval_s: float = 1.0) -> None:
    """In a worker: stop gracefully (SIGTERM to itself) as soon as its agent or the CLI is gone."""
    parent = os.getppid()
    die_with_parent(signal.SIGTERM)
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0")) or None

    def orphaned() -> str | None:
        # Not "parent == 1": in a container the agent may itself be pid 1.
        if os.getppid() != parent:
            return f"the launcher that started this worker (pid {parent}) is gone"
        if launcher is not None and not alive(launcher):
            return f"`tunefleet run` (pid {launcher}) is gone"
        return None

    threading.Thread(target=_watch, args=(orphaned, interval_s), name="tunefleet-launcher-watchdog",
                     daemon=True).start()


def _watch(orphaned: Callable[[], str | None], interval_s: float) -> None:
    while True:
        reason = orphaned()
        if reason:
            _say(f"[tunefleet] rank {os.environ.get('RANK', '?')}: {reason}; stopping after the current step")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(interval_s)


def _say(message: str) -> None:
    try:  # the launcher that owned our stderr may be gone with its pipe
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass
