"""DDP and DeepSpeed ZeRO through accelerate: one code path, the engine differs.

Accumulation uses accelerate's own machinery (`accumulate` + `backward`), which both backends
honour: DDP skips the gradient all-reduce on all but the last micro batch, and DeepSpeed's engine
is told where the accumulation boundary is and steps there. Both divide the loss by the number of
accumulation steps, which our normalisation (see launcher.train.loop) already accounts for, so
we multiply it back.
"""

from __future__ import annotations

import contextlib

import torch

from launcher.distributed import deepspeed_config


class AccelerateBackend:
    """Backend for distributed.backend = ddp | deepspeed."""

    def __init__(self, recipe, accumulation: int, precision: str):
        self.recipe = recipe
        self.accumulation = accumulation
        self.ds_config = None
        if recipe.distributed.backend == "deepspeed":
            raw = deepspeed_config.read_ds_config(recipe.distributed.config)
            self.ds_config = deepspeed_config.resolve(raw, recipe, accumulation, precision,
                                                      source=str(deepspeed_config.find_ds_config(recipe.distributed.config)))

    @property
    def name(self) -> str:
        if self.ds_config is None:
            return "ddp"
        return f"deepspeed ZeRO-{deepspeed_config.zero_stage(self.ds_config)}"

    @property
    def zero_stage(self) -> int:
        return deepspeed_config.zero_stage(self.ds_config) if self.ds_config else 0

    @property
    def sharded_state(self) -> bool:
        """Optimizer state split over ranks: a checkpoint resumes only at the same world size."""
        return self.zero_stage >= 1

    @property
    def params_sharded(self) -> bool:
        return self.zero_stage == 3

    def accelerator_kwargs(self) -> dict:
        kwargs = {"gradient_accumulation_steps": self.accumulation}
        if self.ds_config is not None:
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=self.ds_config)
        return kwargs

    def optimizer_class(self):
        """ZeRO-Offload runs the optimizer step on the CPU with DeepSpeed's vectorised Adam."""
        if self.ds_config is not None and deepspeed_config.offloads_optimizer(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return lambda groups, lr, betas: DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
        return None

    def prepare(self, accelerator, model, make_optimizer):
        return accelerator.prepare(model, make_optimizer(model))

    def micro_step(self, accelerator, model, last: bool):
        return accelerator.accumulate(model)

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        accelerator.backward(loss * self.accumulation)

    def clip_gradients(self, accelerator, model, max_norm: float | None):
        if self.ds_config is not None:
            return None  # DeepSpeed clips inside its step (gradient_clipping in its config)
        if not max_norm:
            return None
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def grad_norm_after_step(self, accelerator, clipped):
        if self.ds_config is not None and accelerator.deepspeed_engine_wrapped is not None:
            return accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        return clipped

    def full_state_dict(self, accelerator, model) -> dict:
        """Every tensor whole (ZeRO-3 gathers them); called on all ranks, meaningful on the main one."""
        return accelerator.get_state_dict(model)

    def whole_parameters(self, accelerator, model):
        """Context in which every rank holds whole trainable parameters (ZeRO-3 gathers them), so the
        main process alone may run code that reads them (peft computes prompt embeddings to save)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])

    def save_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        if self.ds_config is not None:
            accelerator.save_state(folder, exclude_frozen_parameters=True)
        else:
            accelerator.save_state(folder)

    def load_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        if self.ds_config is not None:
            accelerator.load_state(folder, load_module_strict=False)
        else:
            accelerator.load_state(folder)

    def resolved_config(self) -> dict:
        return {"backend": self.name, "deepspeed": self.ds_config}
