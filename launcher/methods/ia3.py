"""IA3: learned vectors that rescale keys, values and feed-forward activations."""

from launcher.methods.common import MethodContext, peft_task_type, wrap_with_peft


def apply(model, cfg, ctx: MethodContext):
    from peft import IA3Config

    config = IA3Config(
        task_type=peft_task_type(ctx.task),
        target_modules=cfg.target_modules,
        feedforward_modules=cfg.feedforward_modules,
    )
    return wrap_with_peft(model, config)
