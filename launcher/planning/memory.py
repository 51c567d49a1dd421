"""Per-device memory of a run: model states, the peak of a training step and the peak of loading.

Model states, in bytes per parameter (P all parameters, T the trainable ones, N the ranks a
backend shards over):
- weights (and the adapter's own parameters, shown apart): frozen parameters in the weight dtype
  launcher.distributed.device_settings resolves (model.dtype=auto: the compute dtype, float32 for
  full fine-tuning); QLoRA: 4-bit linear weights plus their quantisation constants, the rest float32
  (peft's prepare_model_for_kbit_training upcasts it); trainable ones in float32 (launcher keeps
  them so). DeepSpeed with bf16/fp16 holds every weight in 16 bits and a float32 master copy of the
  trainable ones in the optimizer, as its own estimators assume; ZeRO-3 and FSDP shard weights over
  N. FSDP2 gathers one block at a time (and keeps the root's own parameters, embeddings and head,
  whole from forward to backward); ZeRO-3 keeps a gathered parameter until its use in backward when
  that comes within stage3_max_reuse_distance, up to stage3_max_live_parameters (1e9 each by default:
  a model smaller than that is gathered whole on every rank from forward to backward).
- gradients: 4 x T (float32), sharded by ZeRO-2/3 and FSDP; DDP adds its bucket copy (4 x T) at
  world size > 1; in 16-bit modes ZeRO-1 also holds the whole 16-bit gradients (2 x T), ZeRO-2 a
  16-bit partition (2 x T / N), as DeepSpeed's own estimators count them. FSDP2 with
  distributed.fsdp_defer_gradient_sync holds the unsharded float32 gradients of every trainable
  parameter (4 x T on every rank) until the step's last micro batch.
- optimizer: AdamW 8 x T (two float32 moments), 8-bit AdamW 2 x T; sharded by ZeRO and FSDP;
  offload moves it (and with ZeRO-3 param offload, the weights) to host memory. torch's AdamW
  without foreach or fused kernels (a CPU) steps one tensor at a time with two scratch tensors the
  size of the largest.

The peak of a step is the larger of two moments: the end of a micro batch's forward (model states,
the gradients earlier micro batches of the step left, the activations kept for backward and the
loss's transient: launcher.planning.activations) and the optimizer step (model states, every
gradient, the optimizer's scratch). With one micro batch per step the gradients replace the
activations block by block in backward, so they never coexist whole.

Loading: the rank that loads holds the whole model in the weight dtype (a float32 safetensors file
loaded in float32 is memory-mapped, not copied) before sharding, which then copies its shard out:
DDP and DeepSpeed ZeRO-1/2 load on every rank; FSDP2 on rank 0 only (launcher.model.lean_load; the
other ranks build on the meta device), which keeps its whole tensors as the source of every rank's
shard until all are filled; ZeRO-3 partitions while loading (zero.Init), each rank holding its
partition and one gathered block on its device (but reads the whole checkpoint into host memory).
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
    defer_grad_sync: bool = False  # FSDP: unsharded gradients held until the step's last micro batch
    lean_loading: bool = False  # FSDP with several ranks: rank 0 loads, the others are filled after sharding
    # ZeRO-3 releases a gathered parameter only if it is not used again within max_reuse_distance elements
    # and keeps at most max_live_parameters gathered (both 1e9 unless the DeepSpeed JSON says otherwise).
    zero3_live: int = 10**9

    @property
    def stage(self) -> int:
        return {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(self.backend, 0)


@dataclass(frozen=True)
class Precision:
    """The dtypes and kernels the device settings resolved (launcher.distributed.device_settings)."""
    precision: str  # bf16, fp16 or fp32
    weight_dtype: str  # what the frozen weights load in
    fused_adamw: bool = False

    @property
    def sixteen_bit(self) -> bool:
        return self.precision in ("bf16", "fp16")


@dataclass
class Estimate:
    device: dict[str, float]  # bytes per device at the step's peak, by part
    host: dict[str, float]  # bytes per process moved to host memory by offload
    loading: dict[str, float] = field(default_factory=dict)  # bytes per device at the peak of loading, by part
    phase: str = ""  # which moment of a step is its peak
    phases: dict[str, float] = field(default_factory=dict)  # total bytes at each moment considered

    @property
    def training(self) -> float:
        return sum(self.device.values())

    @property
    def loading_total(self) -> float:
        return sum(self.loading.values())

    @property
    def total(self) -> float:
        """The run's peak per device: training's or loading's, whichever is larger."""
        return max(self.training, self.loading_total)


def block_matmul_params(shape: ModelShape, num_labels: int | None) -> int:
    return max((sum(lin.inp * lin.out for lin in linears(shape, num_labels) if lin.layer == b)
                for b in range(shape.layers)), default=0)


@dataclass(frozen=True)
class States:
    """Model-state bytes per device (before the moment-by-moment accounting of `step_peak`)."""
    weights: float
    adapter: float
    optimizer: float
    gradients: float  # at the end of the step's backward
    gradients_held: float  # during a micro batch's forward: buffers that persist, and earlier micro batches'
    gathered: float  # weights gathered by sharding backends while a block runs (and FSDP's root)
    scratch: float  # the optimizer step's temporaries
    host: dict[str, float]


def model_state_bytes(shape: ModelShape, params_total: int, train: Trainable, setup: Setup, prec: Precision,
                      optimizer: str, qlora: dict | None, num_labels: int | None, accumulation: int = 1) -> States:
    T, P = train.total, params_total
    frozen = P - T  # P counts the adapter too: what remains is the frozen base
    wbytes = DTYPE_BYTES[prec.weight_dtype]
    if qlora:
        quantized = sum(lin.inp * lin.out for lin in linears(shape, num_labels) if lin.layer is not None)
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if qlora["double_quant"] else 4 / 64)
        frozen_bytes = quantized * per_param + (frozen - quantized) * 4  # the rest upcast to float32 by peft
    else:
        frozen_bytes = frozen * wbytes
    deepspeed_16bit = setup.backend.startswith("zero") and prec.sixteen_bit
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
    host: dict[str, float] = {}
    param_bytes = 2 if prec.sixteen_bit else 4  # what FSDP2's mixed precision and ZeRO gather in
    gathered = 0.0
    if setup.stage == 3 and not setup.shard_grad_op:
        gathered = 2 * block_matmul_params(shape, num_labels) * param_bytes  # this block and the next
        if setup.backend == "fsdp":
            root = sum(p.numel for p in _root_params(shape, num_labels))
            gathered += root * param_bytes
        else:
            # Every parameter is used again in backward within its reuse distance: ZeRO-3 keeps what it
            # gathered in forward, up to max_live_parameters (the whole of a model smaller than that).
            gathered = max(gathered, min(P, setup.zero3_live) * param_bytes)
        if setup.offload_params:
            host["weights"], host["adapter"] = weights / n, adapter / n
            weights, adapter = 0.0, 0.0
        else:
            weights, adapter = weights / n, adapter / n
    # Gradients, at the end of backward and during a micro batch's forward.
    if setup.backend == "fsdp":
        sharded = grads / n
        if setup.defer_grad_sync and accumulation > 1:
            gradients, held = grads + sharded, grads  # unsharded until the last micro batch, then reduce-scattered
        else:
            gradients, held = sharded, sharded if accumulation > 1 else 0.0
    elif setup.stage >= 2:
        # Reduced into each rank's float32 partition as they are produced; ZeRO-2 also keeps a 16-bit
        # partition (DeepSpeed's estimator counts 2 bytes), ZeRO-3 only buckets.
        gradients = grads / n + (2 * T / n if deepspeed_16bit and setup.stage == 2 else 0)
        held = gradients
    else:
        gradients = grads + (2 * T if deepspeed_16bit else 0)
        held = gradients if accumulation > 1 else 0.0
        if setup.backend == "ddp" and n > 1:
            gradients += grads  # DDP's reduction buckets, allocated once and kept
            held += grads
    # Optimizer states (with DeepSpeed's float32 masters).
    states = (moments + master) / (n if setup.stage >= 1 else 1)
    if setup.offload_optimizer:
        host["optimizer"] = states
        states = 0.0
    if prec.fused_adamw or setup.offload_optimizer or optimizer == "adamw_8bit":
        scratch = 0.0
    elif setup.backend.startswith("zero") and setup.stage >= 1:
        scratch = 2 * 4 * T / n  # DeepSpeed steps its flat float32 partition as one tensor
    else:
        scratch = 2 * 4 * train.largest / (n if setup.stage == 3 else 1)
    return States(weights=weights, adapter=adapter, optimizer=states, gradients=gradients, gradients_held=held,
                  gathered=gathered, scratch=scratch, host=host)


def _root_params(shape: ModelShape, num_labels: int | None):
    from launcher.planning.params import parameters

    return [p for p in parameters(shape, num_labels) if p.layer is None]


def step_peak(states: States, kept: float, transient: float) -> tuple[str, dict[str, float], dict[str, float]]:
    """(the moment that peaks, its parts, the total at each moment considered)."""
    base = {"weights": states.weights, "adapter": states.adapter, "optimizer": states.optimizer}
    if states.gathered:
        base["gathered weights"] = states.gathered
    forward = {**base, "gradients": states.gradients_held, "activations": kept, "activation peak": transient}
    step = {**base, "gradients": states.gradients, "optimizer step": states.scratch}
    phases = {"end of a micro batch's forward": sum(forward.values()), "optimizer step": sum(step.values())}
    phase = max(phases, key=phases.get)
    return phase, forward if phase.startswith("end") else step, phases


def loading_bytes(shape: ModelShape, params_total: int, train: Trainable, setup: Setup, prec: Precision,
                  qlora: dict | None, num_labels: int | None, on_host: bool = False) -> dict[str, float]:
    """Bytes per device at the peak of loading, by part (the rank that loads, where they differ)."""
    frozen = params_total - train.total
    wbytes = DTYPE_BYTES[prec.weight_dtype]
    if qlora:
        quantized = sum(lin.inp * lin.out for lin in linears(shape, num_labels) if lin.layer is not None)
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if qlora["double_quant"] else 4 / 64)
        biggest = max(lin.inp * lin.out for lin in linears(shape, num_labels))
        # Each weight is read in float32 and quantized in turn: one whole tensor at a time.
        whole = quantized * per_param + (params_total - quantized) * 4 + biggest * 4
    else:
        # The trainable parameters load in the weight dtype and are then kept in float32.
        whole = frozen * wbytes + (train.total - train.adapter) * 4 + train.adapter * 4
    n = setup.shards
    block = block_matmul_params(shape, num_labels) * wbytes
    if setup.backend == "zero3":
        if on_host:  # every rank reads the whole checkpoint into host memory, then keeps its partition
            return {"weights (whole, each rank reads)": whole, "gathered block": block}
        return {"weights (partition)": whole / n, "gathered block": block}
    if setup.backend == "fsdp" and n > 1:
        # Rank 0 (lean loading) or every rank keeps its whole tensors until every shard is filled.
        return {"weights (whole, before sharding)": whole, "weights (shard)": whole / n}
    return {"weights (whole)": whole}
