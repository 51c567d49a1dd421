"""Optimizer and schedule: AdamW (torch or bitsandbytes 8-bit) with per-parameter-group rates.

Parameter groups split on two axes: weight decay (never on biases, norms or embeddings-like 1-D
tensors) and, with `train.layer_lr_decay < 1`, the transformer block a parameter sits in: block
i of N trains at lr * decay**(N - i), anything before the blocks (embeddings) at decay**(N + 1),
anything after them (final norm, heads, adapters outside blocks) at the full rate.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.methods.common import layer_index_by_param, transformer_layers


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier of every parameter under layer-wise decay."""
    num_layers = len(transformer_layers(model))
    layer_of = layer_index_by_param(model)  # names as model.named_parameters() gives them
    scales, inside_or_after_blocks = {}, False
    for name, _ in model.named_parameters():
        if name in layer_of:
            inside_or_after_blocks = True
            scales[name] = decay ** (num_layers - layer_of[name])
        else:
            scales[name] = 1.0 if inside_or_after_blocks else decay ** (num_layers + 1)
    return scales


def real_ndim(param: torch.Tensor) -> int:
    """Dimensions of the whole parameter: under ZeRO-3 the local tensor is an empty 1-D placeholder
    from the moment the model loads, and its real shape is kept in ds_shape."""
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, layer_lr_decay: float) -> list[dict]:
    scale_of = layer_scales(model, layer_lr_decay) if layer_lr_decay < 1.0 else {}
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if real_ndim(param) < 2 or "norm" in name.lower() else weight_decay
        scale = scale_of.get(name, 1.0)
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr": lr * scale, "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, train_cfg, optimizer_class=None, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the parameter groups; `optimizer_class` lets a backend substitute its own (ZeRO-Offload).
    `fused`: torch's fused AdamW kernel, one launch for all parameters (parameters on a GPU only:
    launcher.distributed.device_settings decides)."""
    groups = parameter_groups(model, train_cfg.lr, train_cfg.weight_decay, train_cfg.layer_lr_decay)
    for group in groups:
        group.pop("names")
    kwargs = {"lr": train_cfg.lr, "betas": tuple(train_cfg.betas)}
    if optimizer_class is not None:
        return optimizer_class(groups, **kwargs)
    if train_cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = train_cfg.warmup_steps if train_cfg.warmup_steps is not None else round(train_cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train_cfg.scheduler == "constant" else train_cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """What the optimizer really is and how its groups are set up (for RUN/distributed.json)."""
    groups = []
    for group in optimizer.param_groups:
        elements = sum(getattr(p, "ds_numel", None) or p.numel() for p in group["params"])
        groups.append({"lr": group["lr"], "weight_decay": group["weight_decay"], "tensors": len(group["params"]),
                       "elements": elements})
    defaults = optimizer.defaults
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "betas": list(defaults.get("betas", ())), "eps": defaults.get("eps"), "groups": groups}


class OptimizerMaker:
    """Builds the optimizer when a backend asks (`make_optimizer(model, optimizer_class)`, after it has
    wrapped or sharded the model) and keeps what the backend's wrapper hides: the raw optimizer,
    whose param groups the schedule drives under every wrapper, and its description, taken before
    ZeRO swaps its groups for flat partitions."""

    def __init__(self, train_cfg, fused: bool):
        self.train_cfg, self.fused = train_cfg, fused
        self.raw: torch.optim.Optimizer | None = None
        self.description: dict | None = None

    def __call__(self, prepared_model: nn.Module, optimizer_class=None) -> torch.optim.Optimizer:
        self.raw = build_optimizer(prepared_model, self.train_cfg, optimizer_class, fused=self.fused)
        self.description = describe_optimizer(self.raw)
        return self.raw
