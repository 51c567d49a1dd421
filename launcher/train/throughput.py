"""Throughput of a run: tokens per second, padding, and model FLOPs utilisation on GPUs.

Model FLOPs count the work the model needs, not what the hardware did (recomputation under
gradient checkpointing and padding are not useful work, so they lower MFU, as they should):
- every matmul weight (in x out, read from the modules, so 4-bit and sharded weights count at
  their logical shape): 2 FLOPs per token forward, 2 backward for the input gradient, and 2 more
  for the weight gradient only where the weight trains (an adapter run skips the base's);
- attention scores and values: 4 x hidden per query-key pair per layer forward, twice that
  backward; a causal model has len x (len + 1) / 2 pairs per example, an encoder len x len.
MFU = model FLOPs per second / the device's dense peak at the training precision, looked up by
device name; unknown devices (and CPUs) report no MFU rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense (no sparsity) peak tensor throughput, FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = {  # name fragment -> {precision: peak}
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},  # SXM; PCIe is matched first
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},  # fp32 via TF32
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_FLOPS.items():  # insertion order: specific names before general ones
        if fragment in name:
            return peaks.get(precision)
    return None


def model_flops_utilisation(accelerator, flops: float, seconds: float) -> float | None:
    """Model FLOPs per second over the peak of all processes' devices; None off a known GPU."""
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    peak = device_peak_flops(accelerator.device, precision)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * accelerator.num_processes)


@dataclass(frozen=True)
class FlopsModel:
    matmul_params: int  # in x out over every linear map, the output head included
    trained_matmul_params: int  # those whose weight gets a gradient
    layers: int
    hidden: int

    @classmethod
    def of(cls, model) -> "FlopsModel":
        total = trained = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
                continue
            if hasattr(module, "base_layer"):  # an adapter wrapper: its base layer and adapters count themselves
                continue
            size = int(module.in_features) * int(module.out_features)
            total += size
            trained += size if weight.requires_grad else 0
        config = _config_of(model)
        return cls(matmul_params=total, trained_matmul_params=trained,
                   layers=int(getattr(config, "num_hidden_layers", 0) or 0),
                   hidden=int(getattr(config, "hidden_size", 0) or 0))

    def step_flops(self, tokens: int, attention_pairs: int) -> float:
        matmuls = tokens * (4 * self.matmul_params + 2 * self.trained_matmul_params)
        attention = 3 * 4 * self.layers * self.hidden * attention_pairs
        return float(matmuls + attention)


def _config_of(model):
    seen = model
    for _ in range(4):  # through DDP / engine / peft wrappers to the transformers model
        if hasattr(seen, "config") and hasattr(seen.config, "hidden_size"):
            return seen.config
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None) or seen
    return getattr(seen, "config", None)
