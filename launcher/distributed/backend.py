"""The contract every distributed backend (DDP, DeepSpeed ZeRO, FSDP2) implements, and the registry.

The training loop talks to a backend only through `Backend`, so adding a backend, or changing
one, is local to its module. Who decides what:

- The loop decides when gradients are synchronised and when the optimizer steps: before each
  micro batch's forward it calls `sync_gradients(sync)`, true only for the step's last one, and
  after the last backward it calls `optimizer_step` once. No backend keeps a hidden micro-step counter (accelerate's `accumulate()` does, and restores
  it from a checkpoint, which misplaces optimizer steps when a run resumes with another
  accumulation), so a resumed run may change micro batch and world size freely where the state
  allows it.
- The loss handed to `backward` is already normalised over the whole global batch (see
  launcher.train.step); backends must not rescale it.
- Anything that reads whole tensors (artifact saves, checksums, prompt encoders) goes through
  `full_state_dict` / `whole_parameters`, because sharded backends hold only pieces.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol

import torch


class Backend(Protocol):
    name: str  # shown to the user and written to distributed.json, e.g. "deepspeed ZeRO-3"
    sharded_state: bool  # optimizer state split over ranks: a checkpoint resumes at the same world size only
    params_sharded: bool  # each rank holds a shard of the parameters: forwards are collectives

    def prepare_environment(self) -> None:
        """Adjust the process environment before accelerate's Accelerator is created."""

    def accelerator_kwargs(self) -> dict:
        """Extra keyword arguments for accelerate.Accelerator (e.g. DeepSpeed's plugin)."""

    def check_accelerator(self, accelerator) -> None:
        """Refuse to train if accelerate set up something other than this backend."""

    def build_model(self, accelerator, build) -> torch.nn.Module:
        """This rank's model from `build(on_meta)`: every rank loads the weights (`build(False)`), or a
        backend that fills ranks from rank 0 in `prepare` lets the others build on the meta device."""

    def prepare(self, accelerator, model: torch.nn.Module, make_optimizer) -> tuple[torch.nn.Module, Any]:
        """Wrap or shard the model, build the optimizer with `make_optimizer(model)`; return both."""

    def sync_gradients(self, accelerator, model, sync: bool) -> None:
        """Before a micro batch's forward: `sync` marks the step's last micro batch, by which time every
        gradient must be reduced over ranks; a backend may reduce earlier (FSDP2 reduce-scatters every
        micro batch, so gradients stay sharded) or only then (DDP, ZeRO)."""

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (already normalised: do not rescale it)."""

    def optimizer_step(self, accelerator, model, optimizer, max_grad_norm: float | None) -> float | None:
        """Clip, step and zero the gradients; return the gradient norm before clipping, where known."""

    def full_state_dict(self, accelerator, model, names: set[str] | None = None) -> dict:
        """Every tensor whole (only those in `names` when given); a collective (call on all ranks),
        meaningful on the main process."""

    def whole_parameters(self, accelerator, model) -> ContextManager:
        """A context in which every rank holds whole trainable parameters."""

    def save_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        """Write everything needed to continue: trainable weights, optimizer, schedule, RNG of every rank."""

    def load_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        """Restore what `save_state` wrote (all ranks call it)."""

    def resolved_config(self, accelerator) -> dict:
        """What the run really used (no "auto" left), for RUN/distributed.json."""

    def resume_fingerprint(self) -> dict:
        """Settings a checkpoint depends on: a resume that changes any of them is refused."""


def make_backend(recipe, accumulation: int, precision: str, settings=None) -> Backend:
    """The backend `distributed.backend` names (imported lazily: each pulls its own libraries).
    `settings`: the run's launcher.distributed.device_settings.DeviceSettings (None: a CPU's)."""
    backend = recipe.distributed.backend
    if backend == "fsdp":
        from launcher.distributed.fsdp_backend import FsdpBackend

        return FsdpBackend(recipe, accumulation, precision, settings)
    if backend == "deepspeed":
        from launcher.distributed.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(recipe, accumulation, precision, settings)
    from launcher.distributed.ddp_backend import DdpBackend

    return DdpBackend(recipe, accumulation, precision, settings)


def unwrapped(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP (or compiled) wrapper, as `accelerator.unwrap_model` gives it.

    Why not accelerate's: it imports DeepSpeed whenever DeepSpeed is installed, to test for its engine,
    which cost every DDP and FSDP2 process about 1 s at its first save (and DeepSpeed's import-time
    notices). Only a DeepSpeed run has an engine to unwrap; FSDP2 shards the module in place."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.unwrap_model(model)
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
