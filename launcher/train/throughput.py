"""Throughput of a run: tokens per second, padding, and model FLOPs utilisation on GPUs.

Model FLOPs count the work the model needs, not what the hardware did (recomputation under
gradient checkpointing and padding are not useful work, so they lower MFU, as they should):
- every matmul weight (in x out, read from the modules, so 4-bit and sharded weights count at
  their logical shape): 2 FLOPs per token forward, 2 backward for the input gradient, and 2 more
  for the weight gradient only where the weight trains (an adapter run skips the base's);
- the output head only on the positions that need its output: with the chunked loss
  (launcher.train.chunked_loss) the label positions, for classification the pooled one per example;
- attention scores and values: 4 x (heads x head_dim) per query-key pair per layer forward, twice
  that backward (heads x head_dim is not hidden_size in Gemma or Qwen3); a causal model has
  len x (len + 1) / 2 pairs per example, an encoder len x len.
MFU = model FLOPs per second / the device's dense peak at the training precision, looked up by the
device's whole model name (an L40 is no L4). float32 matmuls count the TF32 tensor-core peak only
while torch.backends.cuda.matmul.allow_tf32 is on (DeviceSettings.tf32 turns it on on Ampere and
newer), else the plain float32 peak. Unknown devices (and CPUs) report no MFU rather than a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Dense (no sparsity) peak throughput, FLOP/s, from the vendors' data sheets: bf16/fp16 and tf32 on
# tensor cores, fp32 on the CUDA cores.
PEAK_FLOPS = {  # device model -> {precision: peak}
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def _name_words(name: str) -> set[str]:
    """The words of a CUDA device name: 'NVIDIA A100-SXM4-80GB' -> {NVIDIA, A100, SXM4, 80GB}."""
    return {w for w in re.split(r"[^0-9A-Za-z]+", name.upper()) if w}


def peak_entry(name: str) -> dict[str, float] | None:
    """The PEAK_FLOPS entry whose words all appear as whole words of `name`, the most specific first (an
    'H100 PCIe' before an 'H100'); matching words, not substrings, keeps an L40 or L40S from reading as an L4."""
    words = _name_words(name)
    matches = [key for key in PEAK_FLOPS if _name_words(key) <= words]
    return PEAK_FLOPS[max(matches, key=lambda key: len(_name_words(key)))] if matches else None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The peak at `precision` (bf16, fp16, fp32): float32 matmuls run on TF32 tensor cores only while
    torch.backends.cuda.matmul.allow_tf32 is on."""
    if device.type != "cuda":
        return None
    peaks = peak_entry(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 and "tf32" in peaks:
        return peaks["tf32"]
    return peaks.get(precision)


def model_flops_utilisation(accelerator, flops: float, seconds: float) -> float | None:
    """Model FLOPs per second over the peak of all processes' devices; None off a known GPU."""
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    peak = device_peak_flops(accelerator.device, precision)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * accelerator.num_processes)


HEAD_NAMES = ("lm_head", "score", "classifier")  # output heads: run only where logits are needed


@dataclass(frozen=True)
class FlopsModel:
    matmul_params: int  # in x out over every linear map, the output head included
    trained_matmul_params: int  # those whose weight gets a gradient
    layers: int
    hidden: int
    attention_width: int = 0  # heads x head_dim (0: hidden)
    head_params: int = 0  # of matmul_params: the output head's (lm_head, score; BERT's pooler and classifier)
    trained_head_params: int = 0

    @classmethod
    def of(cls, model) -> "FlopsModel":
        total = trained = head = trained_head = 0
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
                continue
            if hasattr(module, "base_layer"):  # an adapter wrapper: its base layer and adapters count themselves
                continue
            size = int(module.in_features) * int(module.out_features)
            total += size
            trained += size if weight.requires_grad else 0
            if _is_head(name):
                head += size
                trained_head += size if weight.requires_grad else 0
        config = _config_of(model)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        head_dim = int(getattr(config, "head_dim", 0) or 0) or (hidden // heads if heads else 0)
        return cls(matmul_params=total, trained_matmul_params=trained,
                   layers=int(getattr(config, "num_hidden_layers", 0) or 0), hidden=hidden,
                   attention_width=heads * head_dim, head_params=head, trained_head_params=trained_head)

    def step_flops(self, tokens: int, attention_pairs: int, logit_positions: int | None = None) -> float:
        """Model FLOPs of `tokens` positions with `attention_pairs` query-key pairs; the head runs on
        `logit_positions` of them (label tokens under the chunked loss, one per example for a classifier;
        all of them when None)."""
        body = self.matmul_params - self.head_params
        trained_body = self.trained_matmul_params - self.trained_head_params
        logits = tokens if logit_positions is None else logit_positions
        head = 4 * self.head_params + 2 * self.trained_head_params
        matmuls = tokens * (4 * body + 2 * trained_body) + logits * head
        attention = 3 * 4 * self.layers * (self.attention_width or self.hidden) * attention_pairs
        return float(matmuls + attention)


def _is_head(module_name: str) -> bool:
    """The output head, and BERT's pooler (it runs on the pooled position only, like the classifier)."""
    parts = module_name.split(".")
    return any(p in HEAD_NAMES for p in parts) or module_name.endswith("pooler.dense")


def _config_of(model):
    seen = model
    for _ in range(4):  # through DDP / engine / peft wrappers to the transformers model
        if hasattr(seen, "config") and hasattr(seen.config, "hidden_size"):
            return seen.config
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None) or seen
    return getattr(seen, "config", None)
