"""Fault injection for the tests of what cannot happen on this machine: a checkpoint that takes minutes
(a large model on a parallel file system), an NCCL error, a hung collective. Read from the
environment by the training loop; never set in real runs. Each is named for what it imitates.

    TUNEFLEET_TEST_CHECKPOINT_SECONDS=35     every checkpoint takes 35 s longer
    TUNEFLEET_TEST_FAULT=nccl@3              after step 3, rank 0 raises what a broken NCCL link raises
    TUNEFLEET_TEST_FAULT=gpu@3               after step 3, rank 0 raises what a failing GPU raises
    TUNEFLEET_TEST_FAULT=hang@3              after step 3, every rank stops making progress
    TUNEFLEET_TEST_FAULT=gpu@3/0,hang@5/1    each only in that attempt of a Slurm job (SLURM_RESTART_COUNT)
"""

from __future__ import annotations

import os
import time

NCCL_ERROR = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled system error "
              "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5 (injected by TUNEFLEET_TEST_FAULT)")
GPU_ERROR = "CUDA error: uncorrectable ECC error encountered (injected by TUNEFLEET_TEST_FAULT)"


def slow_checkpoint() -> None:
    seconds = float(os.environ.get("TUNEFLEET_TEST_CHECKPOINT_SECONDS", "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def after_step(step: int, is_main: bool) -> None:
    for fault in filter(None, os.environ.get("TUNEFLEET_TEST_FAULT", "").split(",")):
        kind, _, where = fault.partition("@")
        at, _, attempt = where.partition("/")
        if step != int(at or 0) or (attempt and attempt != os.environ.get("SLURM_RESTART_COUNT", "0")):
            continue
        if kind in ("nccl", "gpu") and is_main:
            raise RuntimeError(NCCL_ERROR if kind == "nccl" else GPU_ERROR)
        if kind == "hang":
            while True:  # a collective that never returns: only a watchdog (or a kill) ends this
                time.sleep(60)
