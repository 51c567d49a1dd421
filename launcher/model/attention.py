"""Which attention kernel transformers runs (model.attn_implementation), resolved per device.

auto picks flash_attention_2 only where all three things it needs are there: the flash-attn
package, an NVIDIA GPU of compute capability 8.0 or newer (its kernels are built for Ampere and
later; DeviceProfile.tf32 marks the same generation), and a 16-bit precision (its kernels take
fp16/bf16 only). Anywhere else auto is torch's scaled_dot_product_attention, which runs on every
device. An explicit request that cannot run here is refused before anything loads, naming what is
missing: a silent switch would make the recorded kernel a lie, and failing inside from_pretrained
(or, worse, in the first forward on the GPU) costs a queue wait.

The kernel decides how packed micro batches are laid out (launcher.data.packing_check): flash
attention keeps examples apart only in one flattened row, the others in rows with restarting
position ids.
"""

from __future__ import annotations

import importlib.util

from launcher.errors import UserError

FLASH = "flash_attention_2"
# Kernels that need nothing beyond torch and transformers (flex_attention: torch 2.5 or newer,
# while pyproject allows torch 2.4 for GPU users who bring their own build).
PORTABLE = ("sdpa", "eager", "flex_attention")
FLEX_TORCH = (2, 5)


def flash_attn_importable() -> bool:
    """Whether the flash-attn package is importable, without importing it (that loads its CUDA extension)."""
    return importlib.util.find_spec("flash_attn") is not None


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def flash_attention_problem(profile, precision: str, installed: bool) -> tuple[str, str] | None:
    """(why flash_attention_2 cannot run on `profile` at `precision`, how to fix it), or None if it can."""
    if not installed:
        return "the flash-attn package is not installed", "install it (pip install flash-attn --no-build-isolation)"
    if not profile.gpu:
        return f"it runs on NVIDIA GPUs only and this device is {profile.name}", "run on a GPU"
    if not profile.tf32:
        return (f"it needs compute capability 8.0 or newer (Ampere, Hopper) and {profile.name} is older",
                "run on an A100, H100 or newer")
    if precision not in ("bf16", "fp16"):
        return ("its kernels take bf16 or fp16 only and train.precision resolved to fp32",
                "set train.precision=bf16 (or auto on a GPU with bf16)")
    return None


def resolve_attn_implementation(requested: str, profile, precision: str,
                                flash_attn_installed: bool | None = None) -> tuple[str, str]:
    """(implementation, why) for `requested` on the device `profile` at `precision` (accelerate's word).

    `flash_attn_installed` None means: look on this machine. Raises UserError for an explicit
    flash_attention_2 that cannot run here.
    """
    installed = flash_attn_importable() if flash_attn_installed is None else flash_attn_installed
    problem = flash_attention_problem(profile, precision, installed)
    if requested == "auto":
        if problem is None:
            return FLASH, (f"auto: flash-attn is installed, {profile.name} is sm80 or newer and precision is "
                           f"{precision}")
        return "sdpa", f"auto: torch's scaled_dot_product_attention (not flash_attention_2: {problem[0]})"
    if requested == FLASH and problem is not None:
        why, fix = problem
        raise UserError(f"model.attn_implementation=flash_attention_2 cannot run here: {why}; {fix}, or set "
                        "model.attn_implementation=sdpa (or auto, which picks flash attention where it can run)")
    if requested == "flex_attention" and torch_version() < FLEX_TORCH:
        raise UserError(f"model.attn_implementation=flex_attention needs torch 2.5 or newer (this is "
                        f"{'.'.join(map(str, torch_version()))}); upgrade torch or set model.attn_implementation=sdpa")
    if requested != FLASH and requested not in PORTABLE:
        raise UserError(f"model.attn_implementation={requested} is not one of auto, {FLASH}, "
                        f"{', '.join(PORTABLE)}")
    return requested, "model.attn_implementation"


# The class attribute transformers models declare for each kernel they implement.
SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", FLASH: "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def fit_to_model(settings, recipe, model_path: str):
    """The device settings with auto's kernel replaced by eager where the model class does not implement
    it (Bloom and MPT have no sdpa path in transformers 5.23; from_pretrained would refuse it). An explicit
    choice is left to transformers, whose refusal names the kernel. Remote code is not inspected."""
    import dataclasses

    if recipe.model.attn_implementation != "auto" or settings.attn_implementation == "eager":
        return settings
    model_class = _model_class(recipe, model_path)
    flag = SUPPORT_FLAGS.get(settings.attn_implementation)
    if model_class is None or flag is None or getattr(model_class, flag, True):
        return settings
    return dataclasses.replace(settings, attn_implementation="eager", attn_why=(
        f"auto: {model_class.__name__} does not implement {settings.attn_implementation}; eager attention"))


def _model_class(recipe, model_path: str):
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code,
                                            revision=recipe.model.revision)
        mapping = (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if recipe.model.task == "classification"
                   else MODEL_FOR_CAUSAL_LM_MAPPING)
        return mapping[type(config)]
    except Exception:  # remote code, an unknown architecture: let from_pretrained decide
        return None
