"""DDP through accelerate: every rank holds the whole model; gradients are all-reduced.

The loop says which micro batch synchronises (`sync_gradients`): DDP's reducer reads
`require_backward_grad_sync` in forward, so it is set before the forward, not around the backward
(which is why this is not `no_sync()` wrapped around `backward`). accelerate is given no
accumulation count, so its own backward does not rescale the loss and its optimizer wrapper steps
whenever asked (its hidden micro-step counter is never consulted).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from launcher.distributed.backend import unwrapped
from launcher.errors import UserError


class DdpBackend:
    name = "ddp"
    sharded_state = False  # every rank holds the whole optimizer state: any world size may resume
    params_sharded = False

    def __init__(self, recipe, accumulation: int, precision: str, settings=None):
        self.settings = settings  # launcher.distributed.device_settings.DeviceSettings; None: a CPU's defaults
        self.recipe = recipe
        self.accumulation = accumulation
        self.precision = precision

    def prepare_environment(self) -> None:
        pass

    def accelerator_kwargs(self) -> dict:
        return {}

    def check_accelerator(self, accelerator) -> None:
        pass

    def build_model(self, accelerator, build):
        return build(False)  # every rank holds the whole model anyway

    def prepare(self, accelerator, model, make_optimizer):
        partial = any(not p.requires_grad for p in model.parameters())
        model, optimizer = accelerator.prepare(model, make_optimizer(model))
        install_trainable_only_hooks(accelerator, model_is_partial=partial)
        return model, optimizer

    def sync_gradients(self, accelerator, model, sync: bool) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = sync

    def backward(self, accelerator, loss: torch.Tensor) -> None:
        accelerator.backward(loss)  # applies the fp16 loss scaler where there is one

    def optimizer_step(self, accelerator, model, optimizer, max_grad_norm: float | None) -> float | None:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def full_state_dict(self, accelerator, model, names: set[str] | None = None) -> dict:
        # The live tensors, nothing copied (accelerator.get_state_dict would import DeepSpeed to unwrap).
        state = unwrapped(accelerator, model).state_dict()
        return state if names is None else {k: v for k, v in state.items() if k in names}

    def whole_parameters(self, accelerator, model):
        return contextlib.nullcontext()

    def save_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        accelerator.save_state(folder)  # weights, optimizer, registered scheduler, RNG (CUDA too) per rank

    def load_state(self, accelerator, folder: str, model, optimizer, scheduler) -> None:
        accelerator.load_state(folder)

    def resolved_config(self, accelerator) -> dict:
        return {"backend": self.name}

    def resume_fingerprint(self) -> dict:
        return {"backend": self.name}


def install_trainable_only_hooks(accelerator, model_is_partial: bool) -> None:
    """Save and load only trainable tensors for models whose frozen part comes from the base model,
    which keeps an adapter checkpoint at megabytes instead of the whole model's size."""
    if not model_is_partial:
        return

    def trainable_keys(model) -> set[str]:
        return {name for name, p in unwrapped(accelerator, model).named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            keep = trainable_keys(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            model = unwrapped(accelerator, models[i])
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = load_file(str(Path(input_dir) / name))
            expected = trainable_keys(models[i])
            if set(state) != expected:
                missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
                raise UserError(f"checkpoint {input_dir} does not match this model's trainable parameters "
                                f"(missing {missing}, unexpected {extra}): was it written by another recipe?")
            model.load_state_dict(state, strict=False)
            models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
