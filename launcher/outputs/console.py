"""What a run writes to a person's terminal and Slurm log: tunefleet's lines and real problems, once.

Why: the libraries under a run talk at import and per call, once per rank. A 3-step ZeRO-3 LoRA run at
world size 2 wrote 75 lines of which 26 were tunefleet's: 23 copies of torch.distributed's FutureWarning
that `reduce_scatter_tensor`/`all_gather_into_tensor` are deprecated (raised inside DeepSpeed's own
collectives), bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" and DeepSpeed's
"Setting accelerator to CPU" from every process, transformers' `is_gradient_checkpointing` FutureWarning
(asked by peft) from every process. None of them is the user's to act on.

`output.verbosity`:
- `normal` (the default): deprecation warnings raised in library code are not shown; what libraries log
  below ERROR at import (DeepSpeed's accelerator, bitsandbytes' optional kernels) is not shown; on ranks
  other than the main one, library warnings and logs below ERROR are not shown either, since the main
  rank says the same. tunefleet's own lines, errors, tracebacks and anything a library logs as an error
  are shown, from every rank that has them.
- `debug`: everything, from every rank, as the libraries write it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings

# The libraries a run imports; their own modules raise the deprecations (by module name, as `warnings` sees them).
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "tokenizers")
LIBRARY_MODULES = r"(" + "|".join(LIBRARIES) + r")(\..*)?$"
# Loggers that speak at import about what the user cannot change here.
IMPORT_LOGGERS = ("DeepSpeed", "bitsandbytes")


def quiet_libraries(verbosity: str, *, main_process: bool) -> None:
    """Set this process's warning filters and library log levels for `output.verbosity`."""
    if verbosity == "debug":
        return
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    if not main_process:
        warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not main_process:
        for name in ("transformers", "accelerate", "peft", "datasets", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def import_quietly(*modules: str, verbosity: str) -> None:
    """Import libraries that log at import time (before any level can be set on the logger they create),
    with log records below ERROR dropped meanwhile. A run imports them anyway; this only moves it earlier."""
    quiet = contextlib.nullcontext() if verbosity == "debug" else _logging_below_error_disabled()
    with quiet:
        for module in modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
    if verbosity != "debug":
        for name in IMPORT_LOGGERS:  # DeepSpeed sets its logger's level when it creates it
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _logging_below_error_disabled():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
