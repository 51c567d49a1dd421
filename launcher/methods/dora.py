"""DoRA: LoRA on the direction of each weight plus a learned magnitude vector (peft's use_dora)."""

from launcher.methods.common import MethodContext, wrap_with_peft
from launcher.methods.lora import lora_config


def apply(model, cfg, ctx: MethodContext):
    return wrap_with_peft(model, lora_config(cfg, ctx, use_dora=True))
