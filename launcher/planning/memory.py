"""Per-device memory of a run, estimated from the model's shape and the recipe.

Model states, in bytes per parameter (P all parameters, T the trainable ones, N the ranks a
backend shards over):
- weights (and the adapter's own parameters, shown apart): frozen parameters in model.dtype (QLoRA: 4-bit linear weights plus their quantisation
  constants), trainable ones in float32 (launcher keeps them so). DeepSpeed with bf16/fp16 holds
  every weight in 16 bits and a float32 master copy of the trainable ones in the optimizer, as its
  own estimators assume; ZeRO-3 and FSDP shard weights over N and gather one block at a time.
- gradients: 4 x T (float32), sharded by ZeRO-2/3 and FSDP; DDP adds its bucket copy (4 x T) at
  world size > 1; in 16-bit modes ZeRO-1 also holds the whole 16-bit gradients (2 x T), ZeRO-2 a
  16-bit partition (2 x T / N), as DeepSpeed's own estimators count them.
- optimizer: AdamW 8 x T (two float32 moments), 8-bit AdamW 2 x T; sharded by ZeRO and FSDP;
  offload moves it (and with ZeRO-3 param offload, the weights) to host memory.
Activations per token and block, in elements of the compute dtype (H hidden, K key/value width,
I MLP width), as measured with saved-tensor hooks on CPU (SDPA's fused kernel, no len^2 term):
whole blocks training 8H + 2K + 4I; adapters on attention 5H + 2K + 3I; adapters reaching the MLP
6H + 2K + 4I; frozen blocks that gradients only pass through 4H + 2K + 3I; blocks below the first
trained one nothing. Gradient checkpointing keeps H per block plus one block recomputed. The loss
adds the float32 log-probabilities (4V per token) or, with train.chunked_loss, the float32 hidden
gradient (4H) plus one chunk's logits. tests/test_plan.py compares these with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.planning.params import Trainable, linears
from launcher.planning.shapes import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# CUDA context, NCCL buffers and the caching allocator's slack, on a GPU; the runtime on a CPU.
GPU_OVERHEAD = 1.5 * 2**30
CPU_OVERHEAD = 0.5 * 2**30


@dataclass
class Setup:
    """Where the model states live, from the recipe's distributed section."""
    backend: str  # ddp, fsdp, zero1, zero2, zero3
    shards: int  # ranks the sharded states are divided over
    offload_optimizer: bool = False
    offload_params: bool = False
    shard_grad_op: bool = False  # FSDP: weights stay gathered between forward and backward
    words: list[str] = field(default_factory=list)  # what it shards, in words

    @property
    def stage(self) -> int:
        return {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(self.backend, 0)


@dataclass
class Estimate:
    device: dict[str, float]  # bytes per device, by part
    host: dict[str, float]  # bytes per process moved to host memory by offload

    @property
    def total(self) -> float:
        return sum(self.device.values())


def chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of train.chunked_loss: one chunk's logits about as large as the hidden states,
    but at least 256 tokens. A torch-free twin of launcher.train.chunked_loss.chunk_tokens (the
    planner may not import torch); tests/test_plan.py checks they agree."""
    wanted = max(1, -(-tokens // max(1, -(-vocab // hidden))))
    return max(1 << (wanted - 1).bit_length(), 256)


def _block_elements(shape: ModelShape, regime: str) -> int:
    h, k, i = shape.hidden, shape.kv_dim, shape.intermediate
    return {"all": 8 * h + 2 * k + 4 * i, "attention": 5 * h + 2 * k + 3 * i,
            "mlp+attention": 6 * h + 2 * k + 4 * i, "through": 4 * h + 2 * k + 3 * i, "none": 0}[regime]


def activation_bytes(shape: ModelShape, train: Trainable, tokens: int, compute_bytes: int, checkpointing: bool,
                     chunked_loss: bool, classification: bool) -> tuple[float, float]:
    """(bytes kept for backward, bytes of the transient peak on top) for one micro batch of `tokens` tokens.

    The transient part is one block recomputed under gradient checkpointing, and the loss's logits
    and their gradient while the loss is computed.
    """
    trained = train.trained_layers
    if trained.startswith("last "):
        n = int(trained.split()[1])
        regimes = ["none"] * (shape.layers - n) + ["all"] * n
    elif trained == "none":
        regimes = ["through" if train.grads_reach_layers else "none"] * shape.layers
    else:
        regimes = [trained] * shape.layers
    per_block = [_block_elements(shape, r) * compute_bytes for r in regimes]
    if checkpointing:
        kept = sum(shape.hidden * compute_bytes for r in regimes if r != "none")
        transient = max(per_block, default=0)
    else:
        kept, transient = sum(per_block), 0
    if classification:
        loss_kept = loss_peak = 0.0  # a few logits per example
    elif chunked_loss:
        loss_kept = 4 * shape.hidden  # the hidden states' gradient, computed in the forward pass
        loss_peak = 2 * 4 * shape.vocab * chunk_tokens(tokens, shape.vocab, shape.hidden) / tokens
    else:
        loss_kept = 4 * shape.vocab  # float32 log-probabilities
        loss_peak = 2 * 4 * shape.vocab  # the logits and their gradient while the loss is computed
    return tokens * (kept + loss_kept), tokens * (transient + loss_peak)


def model_state_bytes(shape: ModelShape, params_total: int, train: Trainable, setup: Setup, model_dtype: str,
                      precision: str, optimizer: str, qlora: dict | None, num_labels: int | None) -> Estimate:
    T, P = train.total, params_total
    frozen = P - T  # P counts the adapter too: what remains is the frozen base
    wbytes = DTYPE_BYTES[model_dtype]
    if qlora:
        quantized = sum(lin.inp * lin.out for lin in linears(shape, num_labels) if lin.layer is not None)
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if qlora["double_quant"] else 4 / 64)
        frozen_bytes = quantized * per_param + (frozen - quantized) * wbytes
    else:
        frozen_bytes = frozen * wbytes
    deepspeed_16bit = setup.backend.startswith("zero") and precision in ("bf16", "fp16")
    A = train.adapter
    if deepspeed_16bit:  # every weight in 16 bits; float32 masters of the trainable ones with the optimizer
        weights, adapter = (frozen_bytes if qlora else frozen * 2) + 2 * (T - A), 2 * A
        master = 4 * T
    else:
        weights, adapter = frozen_bytes + 4 * (T - A), 4 * A
        master = 0
    moments = (2 if optimizer == "adamw_8bit" else 8) * T
    grads = 4 * T
    n = setup.shards
    device: dict[str, float] = {}
    host: dict[str, float] = {}
    # Weights.
    if setup.stage == 3 and not setup.shard_grad_op:
        biggest_block = max((sum(lin.inp * lin.out for lin in linears(shape, num_labels) if lin.layer == b)
                             for b in range(shape.layers)), default=0)
        gathered = 2 * biggest_block * (2 if precision in ("bf16", "fp16") else 4)  # this block and the next
        if setup.offload_params:
            host["weights"] = weights / n
            host["adapter"] = adapter / n
            device["weights"], device["adapter"] = gathered, 0.0
        else:
            device["weights"], device["adapter"] = weights / n + gathered, adapter / n
    else:
        device["weights"], device["adapter"] = weights, adapter
    # Gradients.
    if setup.stage >= 2:
        # Reduced into each rank's float32 partition as they are produced; ZeRO-2 also keeps a 16-bit
        # partition (DeepSpeed's estimator counts 2 bytes), ZeRO-3 and FSDP only buckets.
        device["gradients"] = grads / n + (2 * T / n if deepspeed_16bit and setup.stage == 2 else 0)
    else:
        device["gradients"] = grads + (2 * T if deepspeed_16bit else 0)
        if setup.backend == "ddp" and n > 1:
            device["gradients"] += grads  # DDP's reduction buckets
    # Optimizer states (with DeepSpeed's float32 masters).
    states = (moments + master) / (n if setup.stage >= 1 else 1)
    if setup.offload_optimizer:
        host["optimizer"] = states
        device["optimizer"] = 0.0
    else:
        device["optimizer"] = states
    return Estimate(device=device, host=host)
