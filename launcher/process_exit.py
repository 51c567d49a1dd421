"""Ending a tunefleet process without the interpreter's last garbage collection.

Why: a process that imported torch, transformers, peft and datasets holds millions of objects, and at
exit the interpreter runs a full cyclic collection over all of them before it finishes: on this 2-core
machine a 2-process run's workers spent 3.0 s between their last atexit handler and their agent's exit,
both in `gc_collect_main` (py-spy), and 0.6 s with this. Every run, sweep trial, search trial and test
launch paid it once per process. Freezing the objects puts them out of the collector's reach and the
operating system reclaims the memory. Every atexit handler still runs and the standard streams are still
flushed; only a `__del__` of an object caught in a reference cycle is skipped (tunefleet closes its files
and trackers explicitly before it returns).

Only the entry points call this (the `tunefleet` console script, `python -m launcher.cli`, and
launcher/run.py run as a script), never `main()` itself: tests call that in their own long-lived process.
"""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


def exit_with(code: int) -> NoReturn:
    gc.freeze()
    sys.exit(code)
