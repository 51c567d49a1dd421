"""Prefix tuning: learned key/value prefixes in every attention layer; the model stays frozen."""

from launcher.methods.common import MethodContext, peft_task_type, wrap_with_peft


def apply(model, cfg, ctx: MethodContext):
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type=peft_task_type(ctx.task),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
    )
    return wrap_with_peft(model, config)
