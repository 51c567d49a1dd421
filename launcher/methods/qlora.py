"""QLoRA: the base model loaded in 4 bits by bitsandbytes, LoRA adapters trained in higher precision."""

import torch

from launcher.methods.common import MethodContext, wrap_with_peft
from launcher.methods.lora import lora_config


def load_kwargs(cfg, device: torch.device) -> dict:
    """Extra from_pretrained arguments: quantize while loading, onto this process's device."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
    )
    # Each rank quantizes onto its own device; "auto" would spread one copy over all GPUs.
    return {"quantization_config": quantization, "device_map": {"": str(device)}}


def apply(model, cfg, ctx: MethodContext):
    from peft import prepare_model_for_kbit_training

    # Casts norms to float32 and enables input grads, which gradient checkpointing on a frozen,
    # quantized base needs to reach the adapters.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.gradient_checkpointing)
    return wrap_with_peft(model, lora_config(cfg, ctx))
