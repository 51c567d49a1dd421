"""The accelerate invocation a recipe implies, as a pure function that tests assert on.

On a machine without GPUs the obvious `accelerate launch --cpu --num_processes 2` silently starts
ONE process; `--multi_gpu` with ACCELERATE_USE_CPU=1 starts real gloo workers instead, so that is
what we emit there (see shared notes: cpu-distributed.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from launcher.distributed.cpus import cpu_budget

RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"
# A GPU torch can use needs its kernel driver: NVIDIA's (also visible inside containers) or ROCm's.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def has_usable_gpu() -> bool:
    """torch.cuda.is_available(), without importing torch (1.2 s of `tunefleet run`'s start on 2 cores)
    where no GPU driver is loaded at all, as on a CPU machine."""
    if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    import torch

    return torch.cuda.is_available()


def accelerate_command(recipe, words: list[str], *, has_gpu: bool, cpu_count: int | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Return (argv, extra environment) that runs `launcher/run.py words...` as the recipe says.

    `environ` is the environment the command will run in (cli passes os.environ): a setting the
    user made there, such as OMP_NUM_THREADS, is kept rather than replaced by our default.
    """
    environ = {} if environ is None else environ
    dist = recipe.distributed
    argv = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes", str(dist.world_size),  # accelerate counts processes over all machines
        "--num_machines", str(dist.num_machines),
        "--machine_rank", str(dist.machine_rank),
        "--main_process_ip", dist.main_process_ip,
        "--main_process_port", str(dist.main_process_port),
        "--dynamo_backend", "no",
        "--mixed_precision", "no",  # the run chooses precision from train.precision itself
        str(RUN_SCRIPT), *words,
    ]
    env: dict[str, str] = {}
    if not has_gpu:
        if dist.backend != "deepspeed":
            # For DeepSpeed this flag would silently turn DeepSpeed off; it finds the CPU by itself.
            env["ACCELERATE_USE_CPU"] = "1"
        # Oversubscribed CPU threads make every process several times slower: each process gets its
        # share of the cores this run was given (launcher.distributed.cpus), not of the machine's.
        cores = cpu_count or cpu_budget(environ) or 1
        if "OMP_NUM_THREADS" not in environ:
            env["OMP_NUM_THREADS"] = str(max(1, cores // dist.num_processes))
        if "MALLOC_MMAP_THRESHOLD_" not in environ:
            env["MALLOC_MMAP_THRESHOLD_"] = str(CPU_MMAP_THRESHOLD)
    return argv, env


# On CPU every tensor is a glibc allocation. glibc raises its mmap threshold each time a large mmapped
# block is freed (up to 32 MiB), after which FSDP2's per-block gathered weights and the activations
# come from the heap, fragment it, and are never returned: a world-size-2 FSDP run on SmolLM2 peaked at
# 2.0-2.2 GiB per rank, above DDP's 1.6, though each rank holds half the model. A fixed threshold keeps
# blocks of 1 MiB and more in mmap, returned on free: 1.57 GiB, with no slower steps measured under DDP
# or FSDP; 128 KiB (glibc's starting value) saved more (1.38 GiB) but made DDP steps ~1.7x slower
# (benchmarks/fsdp_host_memory.md). A value the user exported is kept.
CPU_MMAP_THRESHOLD = 1 << 20
