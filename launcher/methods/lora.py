"""LoRA: low-rank update matrices beside the frozen weights of the target modules."""

from launcher.methods.common import MethodContext, peft_task_type, wrap_with_peft


def lora_config(cfg, ctx: MethodContext, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        task_type=peft_task_type(ctx.task),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        use_dora=use_dora,
    )


def apply(model, cfg, ctx: MethodContext):
    return wrap_with_peft(model, lora_config(cfg, ctx))
