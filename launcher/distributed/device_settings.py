"""Settings that depend on the device a run trains on, resolved once at launch (and by `tunefleet plan
--device` for a device it is not running on), and recorded in RUN/distributed.json.

The recipe says what the user wants ("auto" wherever the right answer depends on the hardware); this
module turns it into what a GPU or a CPU should do, so the shipped recipes and DeepSpeed JSONs are
right on both without edits:

- precision: auto is bf16 on GPUs that have it, else fp32 (on a CPU, float32 measures fastest with
  torch's kernels here: see the throughput issue's benchmarks).
- frozen weights (model.dtype=auto) load in the compute dtype: under bf16 autocast every matmul reads
  a bf16 copy anyway, so a float32 frozen base costs 2x the weight memory plus the per-use casts that
  autocast saves for backward. Trainable weights are upcast to float32 master weights after loading
  (launcher.methods.common.float32_trainable). peft.method=full loads float32: every weight is a master
  weight, and rounding a float32 checkpoint to bf16 first would lose its low bits for good.
- QLoRA's compute dtype (auto) follows the precision.
- TF32 matmuls on Ampere and newer (float32 matmuls then run on tensor cores; the throughput log
  counts TF32's peak only when it is on), fused AdamW where the parameters live on a GPU, pinned host
  memory for offload, and DeepSpeed's overlap_comm on GPUs. On a CPU all four are off: pinning needs
  CUDA, and overlap needs CUDA streams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """What a device can do, as far as the defaults care."""

    name: str  # cpu, h100, a100, l4, ... or the CUDA device's own name
    gpu: bool
    bf16: bool  # runs bfloat16 matmuls natively
    tf32: bool  # Ampere (sm80) or newer: TF32 tensor cores, and what flash-attn 2 needs
    memory_gib: float | None = None  # per device, for the planner (None: unknown or host memory)


PROFILES = {
    "cpu": DeviceProfile("cpu", gpu=False, bf16=False, tf32=False),
    "h200": DeviceProfile("h200", gpu=True, bf16=True, tf32=True, memory_gib=141),
    "h100": DeviceProfile("h100", gpu=True, bf16=True, tf32=True, memory_gib=80),
    "a100": DeviceProfile("a100", gpu=True, bf16=True, tf32=True, memory_gib=80),
    "l40s": DeviceProfile("l40s", gpu=True, bf16=True, tf32=True, memory_gib=48),
    "l4": DeviceProfile("l4", gpu=True, bf16=True, tf32=True, memory_gib=24),
    "a10g": DeviceProfile("a10g", gpu=True, bf16=True, tf32=True, memory_gib=24),
    "v100": DeviceProfile("v100", gpu=True, bf16=False, tf32=False, memory_gib=32),
}


def this_machine() -> DeviceProfile:
    """The profile of the device this process trains on (cuda:0 of what it sees, or the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return PROFILES["cpu"]
    major, _ = torch.cuda.get_device_capability()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return DeviceProfile(torch.cuda.get_device_name(0), gpu=True, bf16=torch.cuda.is_bf16_supported(),
                         tf32=major >= 8, memory_gib=round(total, 1))


@dataclass(frozen=True)
class DeviceSettings:
    device: str
    precision: str  # accelerate's word: "bf16", "fp16" or "no"
    weight_dtype: str  # what from_pretrained loads (frozen weights keep it)
    qlora_compute_dtype: str | None  # None unless peft.method=qlora
    attn_implementation: str
    attn_why: str
    tf32: bool
    fused_adamw: bool
    pin_memory: bool
    overlap_comm: bool

    def as_json(self) -> dict:
        return asdict(self)


COMPUTE_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


def resolve_precision(setting: str, profile: DeviceProfile) -> str:
    if setting == "auto":
        return "bf16" if profile.gpu and profile.bf16 else "no"
    return {"fp32": "no"}.get(setting, setting)


def resolve(recipe, profile: DeviceProfile, flash_attn_installed: bool | None = None) -> DeviceSettings:
    """The device-dependent settings of `recipe` on `profile`."""
    from launcher.model.attention import resolve_attn_implementation

    precision = resolve_precision(recipe.train.precision, profile)
    compute = COMPUTE_DTYPE[precision]
    weight_dtype = recipe.model.dtype
    if weight_dtype == "auto":
        weight_dtype = "float32" if recipe.peft.method == "full" else compute
    qlora = None
    if recipe.peft.method == "qlora":
        qlora = compute if recipe.peft.compute_dtype == "auto" else recipe.peft.compute_dtype
    attn, why = resolve_attn_implementation(recipe.model.attn_implementation, profile, precision,
                                            flash_attn_installed)
    offload_on_host = recipe.distributed.backend == "fsdp" and recipe.distributed.fsdp_cpu_offload
    return DeviceSettings(
        device=profile.name, precision=precision, weight_dtype=weight_dtype, qlora_compute_dtype=qlora,
        attn_implementation=attn, attn_why=why, tf32=profile.gpu and profile.tf32,
        # torch's fused AdamW steps parameters where they live; with FSDP offload they live on the host.
        fused_adamw=profile.gpu and not offload_on_host and recipe.train.optimizer == "adamw",
        pin_memory=profile.gpu, overlap_comm=profile.gpu)


def apply_process_settings(settings: DeviceSettings) -> None:
    """Process-wide switches (TF32) the settings turn on; call before the first matmul."""
    import torch

    if settings.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
