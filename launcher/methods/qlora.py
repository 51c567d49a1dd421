"""QLoRA: the base model loaded in 4 bits by bitsandbytes, LoRA adapters trained in higher precision."""

import torch

from launcher.methods.common import HEAD_MODULE_NAMES, MethodContext, wrap_with_peft
from launcher.methods.lora import lora_config


def load_kwargs(cfg, device: torch.device, task: str, settings=None) -> dict:
    """Extra from_pretrained arguments: quantize while loading, onto this process's device. The compute
    dtype is the device settings' (compute_dtype=auto follows train.precision)."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, settings.qlora_compute_dtype if settings else
                                       ("float32" if cfg.compute_dtype == "auto" else cfg.compute_dtype)),
        # A new classification head starts random and trains in full: quantizing it breaks peft's
        # modules_to_save copy. Left unset for causal LMs, where transformers' own default list
        # keeps the output head (tied or not) unquantized.
        llm_int8_skip_modules=list(HEAD_MODULE_NAMES) if task == "classification" else None,
    )
    # Each rank quantizes onto its own device; "auto" would spread one copy over all GPUs.
    return {"quantization_config": quantization, "device_map": {"": str(device)}}


def apply(model, cfg, ctx: MethodContext):
    from peft import prepare_model_for_kbit_training

    # Casts norms to float32 and enables input grads, which gradient checkpointing on a frozen,
    # quantized base needs to reach the adapters.
    # peft re-enables checkpointing here, reentrant unless told otherwise: pass the launcher's choice on
    # (reentrant checkpointing under DDP fails with "marked ready twice").
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.gradient_checkpointing,
                                            gradient_checkpointing_kwargs=ctx.gradient_checkpointing_kwargs)
    _keep_training_layout_on_cpu(model)
    return wrap_with_peft(model, lora_config(cfg, ctx))


def _keep_training_layout_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights for a faster CPU kernel on the first forward in eval
    mode and never unpacks them, so training after an evaluation fails on layers with a bias
    ("a view of a leaf Variable ... in-place") and evaluation numbers shift. Keep one layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
