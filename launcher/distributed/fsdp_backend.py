"""FSDP2 (`torch.distributed.fsdp.fully_shard`) used directly, on GPU and CPU alike.

Why not accelerate's FSDP plugin: it switches to FSDP only on GPUs; on a CPU machine the same
launch config silently trains plain DDP, so nothing here could test it. torch's FSDP2 itself runs
on CPU with gloo, so we wrap with it ourselves: each transformer block is one FSDP unit, then the
root. Parameters become DTensors sharded over the mesh; frozen and trainable parameters may share
a unit (FSDP2 shards per parameter), which is what adapters need.

Checkpoints use torch.distributed.checkpoint: every rank writes its shards, and loading reshards,
so a run may resume at a different world size. Artifacts are saved from a gathered full state
dict, never from a rank's shard.

With more than one process, only global rank 0 reads the weights; the others build the model on
the meta device and are filled from rank 0 after sharding (launcher.model.lean_load), so host
memory does not grow with the processes per machine. TUNEFLEET_FSDP_FULL_LOAD=1 makes every rank
load instead: a debugging switch, to compare the two (rank 0's value decides for all ranks).
Either way the whole model is never moved to a device: each rank's device receives its shards
only, and with cpu offload parameters stay on the host (see lean_load's docstring for how).

Gradients stay sharded between micro batches: each micro batch's backward reduce-scatters, and
FSDP2 adds the result into the sharded `.grad` (torch/distributed/fsdp/_fully_shard/
_fsdp_collectives.py `foreach_reduce`: `sharded_param.grad._local_tensor += new_sharded_grad`), as
torchtitan and torchtune do. distributed.fsdp_defer_gradient_sync=true reduces once per step
instead (`set_requires_gradient_sync(False)` before the other micro batches): fewer collectives,
but until the step's last backward every rank holds the unsharded float32 gradient of every
trainable parameter (_fsdp_param.py `to_accumulated_grad_if_needed` keeps it in the reduce dtype).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from launcher.methods.common import transformer_layers
from launcher.model import lean_load

FULL_LOAD_ENV = "TUNEFLEET_FSDP_FULL_LOAD"  # debugging switch: every rank loads the weights


class FsdpBackend:
    sharded_state = False  # DCP reshards on load: any world size may resume
    params_sharded = True

    def __init__(self, recipe, accumulation: int, precision: str, settings=None):
        self.settings = settings  # launcher.distributed.device_settings.DeviceSettings; None: a CPU's defaults
        self.recipe = recipe
        self.accumulation = accumulation
        self.precision = precision
        self.sharding = recipe.distributed.fsdp_sharding
        self.cpu_offload = recipe.distributed.fsdp_cpu_offload
        self.defer_gradient_sync = recipe.distributed.fsdp_defer_gradient_sync
        self.loading: lean_load.LoadRecord | None = None  # set by build_model

    @property
    def name(self) -> str:
        return f"fsdp2 {self.sharding}" + (" + cpu offload" if self.cpu_offload else "")

    def prepare_environment(self) -> None:
        pass

    def accelerator_kwargs(self) -> dict:
        return {}

    def check_accelerator(self, accelerator) -> None:
        pass

    def build_model(self, accelerator, build):
        if accelerator.num_processes == 1:
            self.loading = lean_load.LoadRecord(how=lean_load.EVERY_RANK, why="one process")
            return build(False)
        # Rank 0 decides: ranks that disagreed on who loads would wait on each other forever.
        if _from_rank0(os.environ.get(FULL_LOAD_ENV) == "1"):
            self.loading = lean_load.LoadRecord(how=lean_load.EVERY_RANK, why=f"{FULL_LOAD_ENV}=1 (debugging switch)")
            return build(False)
        model, self.loading = lean_load.build_everywhere(build)
        # Building for real may draw random numbers that building on meta does not (a new classification
        # head): continue from rank 0's generators, as if every rank had loaded (dropout masks match).
        _set_rng_state(_from_rank0(_rng_state()))
        return model

    def _mesh(self, accelerator):
        from torch.distributed.device_mesh import init_device_mesh

        device_type = accelerator.device.type
        dist = self.recipe.distributed
        if self.sharding == "hybrid_shard":
            # Replicate across machines, shard within one: all-gathers stay on the fast local links.
            return init_device_mesh(device_type, (dist.num_machines, dist.num_processes),
                                    mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(device_type, (accelerator.num_processes,))

    def prepare(self, accelerator, model, make_optimizer):
        from torch.distributed.fsdp import (
            CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method,
        )

        if not torch.distributed.is_initialized():
            _single_process_group(accelerator)
        lean = self.loading is not None and self.loading.lean
        source = lean_load.source_state(model) if lean and accelerator.is_main_process else None
        if self.loading is not None:  # the record that this rank held no weights
            self.loading.params_on_meta_before_sharding = _gather(all(p.is_meta for p in model.parameters()),
                                                                  accelerator.num_processes)
        # Never model.to(device): a model larger than one device could not load, and that is why one
        # shards. The weights this rank holds go aside on the host; fully_shard then moves only buffers.
        whole = lean_load.park_on_meta(model)
        options = {
            "mesh": self._mesh(accelerator),
            # shard_grad_op keeps parameters gathered from forward to backward: less traffic, more memory.
            "reshard_after_forward": self.sharding != "shard_grad_op",
        }
        if self.cpu_offload:
            # Pinned host memory lets shards copy to the GPU asynchronously (needs CUDA).
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=bool(self.settings and self.settings.pin_memory))
        if self.precision == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks = transformer_layers(model)
        self.num_units, self.block_class = len(blocks), type(blocks[0]).__name__
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        device = torch.device("cpu") if self.cpu_offload else accelerator.device  # where shards live
        if lean:
            self.loading.broadcast_buffers = lean_load.fill_from_rank0(
                model, source, device=device, buffer_device=accelerator.device, tied=self.loading.tied)
        else:
            lean_load.fill_from_host(model, whole, device)
        del source, whole  # the whole host tensors: the shards are copies
        if hasattr(model, "generate"):
            # generate() bypasses the root's forward, and with it the hook that gathers the root's own
            # parameters (embeddings, head): register it as a forward method.
            register_fsdp_forward_method(model, "generate")
        optimizer = make_optimizer(model)  # after sharding: the optimizer must see the DTensor shards
        return model, optimizer

    def sync_gradients(self, accelerator, model, sync: bool) -> None:
        if self.defer_gradient_sync:
            # Asked for: no collective until the step's last micro batch, unsharded gradients until then.
            model.set_requires_gradient_sync(sync)
        elif self.sharding == "hybrid_shard":
            # Reduce-scatter within the machine every micro batch (gradients stay sharded), but
            # all-reduce across machines, over the slow links, once per step: FSDP2 adds the micro
            # batches' shards into one buffer of the shard's size (_fsdp_collectives.py
            # `partial_reduce_output`) and all-reduces that at the last. Same memory, same sum.
            model.set_requires_all_reduce(sync)
        # full_shard / shard_grad_op: FSDP2's default, reduce-scatter after every backward. Parameters
        # are resharded after every backward in all modes (set_reshard_after_backward stays True):
        # keeping them gathered across micro batches would save all-gathers at the cost of whole blocks.

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        loss.backward()  # bf16 needs no loss scaling; fp16 is refused for FSDP (launcher.config.compat)

    def optimizer_step(self, accelerator, model, optimizer, max_grad_norm: float | None) -> float | None:
        norm = None
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self, accelerator, model, names: set[str] | None = None) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if names is None:
            # A collective: every rank sends its shards; with cpu_offload only rank 0 keeps the result.
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Only the named tensors (an adapter's): gathering the whole model to rank 0's host memory to
        # keep a few MB of it would cost a 70B model's 140 GB there. Same key order on every rank.
        whole = {}
        for key, value in get_model_state_dict(model).items():
            if key in names:
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                if accelerator.is_main_process:
                    whole[key] = value.detach().to("cpu", copy=True)
        return whole

    def gathered_for_inference(self, accelerator, model):
        """Every unit unsharded once and kept so across forwards (launcher.distributed.inference_weights
        decides when it fits); the blocks reshard after forward again afterwards unless shard_grad_op."""
        from launcher.distributed.inference_weights import fsdp_unsharded

        return fsdp_unsharded(model, blocks_reshard_after_forward=self.sharding != "shard_grad_op")

    @contextlib.contextmanager
    def whole_parameters(self, accelerator, model):
        """Every rank unshards the root (and with it the adapter parameters that live there), so the
        main process alone may run code that reads them."""
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    def save_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}  # the frozen base is the input model
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), Path(folder) / "scheduler.pt")
        torch.save(_rng_state(), Path(folder) / f"rng_rank{accelerator.process_index}.pt")

    def load_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        scheduler.load_state_dict(torch.load(Path(folder) / "scheduler.pt", weights_only=False))
        rng_file = Path(folder) / f"rng_rank{accelerator.process_index}.pt"
        if rng_file.exists():  # absent when resuming with more ranks than wrote the checkpoint
            _set_rng_state(torch.load(rng_file, weights_only=False))

    def resolved_config(self, accelerator) -> dict:
        return {"backend": self.name, "fsdp": {
            "sharding": self.sharding, "cpu_offload": self.cpu_offload,
            "reshard_after_forward": self.sharding != "shard_grad_op",
            "defer_gradient_sync": self.defer_gradient_sync, "gradient_reduction": self._gradient_reduction(),
            "param_dtype": "bfloat16" if self.precision == "bf16" else "float32", "reduce_dtype": "float32",
            "units": f"each of the {self.num_units} transformer blocks ({self.block_class}), then the root",
            "model_loading": self.loading.as_json() if self.loading else None}}

    def _gradient_reduction(self) -> str:
        if self.defer_gradient_sync:
            return ("once per step, after the last micro batch: until then every rank holds the unsharded float32 "
                    "gradients of every trainable parameter")
        if self.sharding == "hybrid_shard":
            return ("reduce-scatter within the machine after every micro batch, all-reduce across machines once per "
                    "step: gradients stay sharded")
        return "reduce-scatter after every micro batch: gradients stay sharded"

    def resume_fingerprint(self) -> dict:
        # The sharding mode and offload change only where shards live; DCP reshards on load.
        return {"backend": "fsdp2"}


def _single_process_group(accelerator) -> None:
    """FSDP needs a process group even for one process (a one-rank run resuming a sharded checkpoint)."""
    from launcher.distributed.rendezvous import free_port

    backend = "gloo" if accelerator.device.type == "cpu" else "nccl"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _from_rank0(value):
    sent = [value]
    torch.distributed.broadcast_object_list(sent, src=0)
    return sent[0]


def _gather(value, world_size: int) -> list:
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on the GPU draws from these
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
