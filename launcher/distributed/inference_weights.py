"""Whole weights for evaluation and sample answers under sharded backends (ZeRO-3, FSDP2).

Why: with sharded parameters every forward all-gathers each block's weights and frees them again.
In training that is the price of fitting; in evaluation it is paid again for every batch, and in
generation for every new token of every prompt (a forward per token, each gathering the whole
model): a 3-step LoRA run under ZeRO-3 at world size 2 on CPU spent minutes there against 11 s of
training. When the whole model fits beside what training holds, gathering it once, running every
forward on local weights, and sharding it again costs one all-gather instead of thousands.

How much may be gathered: `eval.gather_weights_gib` per device (null: half of the memory still
free on the device: the CUDA allocator's free memory on a GPU, MemAvailable shared by the local
processes on a CPU). Every rank decides, then they agree on the most cautious answer (an
all-reduce), since a rank that gathered while another did not would wait on it forever.

Inside the context the forwards run no collectives, so the main process may generate alone while
the other ranks go on to the next collective and wait there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass(frozen=True)
class GatherDecision:
    gather: bool
    bytes_needed: int
    bytes_allowed: int
    why: str


def gathered_bytes(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> int:
    """Bytes of every parameter whole, in the dtype it is gathered in (FSDP's param_dtype, or ZeRO's
    16-bit copies under bf16/fp16; the stored dtype otherwise)."""
    total = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel = getattr(param, "ds_numel", None) or param.numel()  # a DTensor's numel is the whole one
        size = torch.tensor([], dtype=compute_dtype).element_size() if compute_dtype else param.element_size()
        total += numel * size
    return total


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // max(local, 1)
    except (OSError, KeyError, ValueError):
        return 0


def decide(accelerator, model, limit_gib: float | None, compute_dtype: torch.dtype | None) -> GatherDecision:
    """Whether to gather the whole model for inference; the same answer on every rank."""
    needed = gathered_bytes(model, compute_dtype)
    if limit_gib is None:
        allowed, source = free_device_bytes(accelerator.device) // 2, "half the free device memory"
    else:
        allowed, source = int(limit_gib * GIB), f"eval.gather_weights_gib={limit_gib:g}"
    fits = torch.tensor([1 if needed <= allowed else 0], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    gather = bool(fits.item())
    why = (f"whole weights ({needed / GIB:.2f} GiB) gathered once for evaluation and samples (within {source})"
           if gather else
           f"whole weights ({needed / GIB:.2f} GiB) exceed {source} on some rank: evaluation and samples gather "
           "block by block in every forward (slow; raise eval.gather_weights_gib if memory allows)")
    return GatherDecision(gather, needed, allowed, why)


@contextlib.contextmanager
def deepspeed_gathered(engine):
    """ZeRO-3: every partition gathered, and the engine's fetch/release hooks off while inside (they
    would free the gathered weights after each module). DeepSpeed's own helper does both, but leaves
    one hook on: the root module's start-of-forward hook, which resets the parameter coordinator's
    step. Until that coordinator holds a complete trace, the reset checks that every rank recorded the
    same module order: a broadcast. The helper itself invalidates the trace when it re-registers the
    hooks, so the first forward after each gathered evaluation or sample makes that broadcast; with the
    main process generating alone it waited there forever while the other rank waited in the step's
    next collective (DeepSpeed 0.19.8, a ZeRO-3 full fine-tune at world size 2). The hook is taken off
    here too and put back first in line, as DeepSpeed registered it."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine), _start_of_forward_hook_off(engine):
        yield


@contextlib.contextmanager
def _start_of_forward_hook_off(engine):
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    handle = getattr(offload, "fwd_pre_hook", None)
    module = getattr(offload, "module", None)
    hook = module._forward_pre_hooks.pop(handle.id, None) if handle is not None and module is not None else None
    if hook is None:
        # A DeepSpeed without this hook (checked on 0.19.8 only): nothing to take off.
        yield
        return
    try:
        yield
    finally:
        offload.fwd_pre_hook = module.register_forward_pre_hook(hook, prepend=True)


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module, blocks_reshard_after_forward: bool):
    """FSDP2: every unit unsharded (a collective), and kept so across forwards, then sharded again.

    The root never reshards after forward (FSDP2's own choice for training, since backward would
    gather it again at once); the blocks get back `blocks_reshard_after_forward`.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # same order on every rank: each unshard is an all-gather
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(blocks_reshard_after_forward and unit is not model, recurse=False)
            unit.reshard()


@contextlib.contextmanager
def for_inference(run):
    """Evaluation and generation run inside this; yields True when every rank holds whole weights
    (forwards are then no collectives), False when forwards still gather block by block."""
    backend = run.backend
    gathering = getattr(backend, "gathered_for_inference", None)
    limit = run.recipe.eval.gather_weights_gib
    if not backend.params_sharded or gathering is None or limit == 0:
        yield not backend.params_sharded
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backend.precision)
    decision = decide(run.accelerator, run.model, limit, dtype)
    if run.inference_gather is None and run.is_main:  # said once per run
        print(f"[tunefleet] {decision.why}", flush=True)
    run.inference_gather = decision
    if not decision.gather:
        yield False
        return
    with gathering(run.accelerator, run.model):
        yield True
