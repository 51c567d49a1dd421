"""Prompt tuning: a learned soft prompt prepended to every input; the model stays frozen."""

from launcher.methods.common import MethodContext, peft_task_type, wrap_with_peft


def apply(model, cfg, ctx: MethodContext):
    from peft import PromptTuningConfig, PromptTuningInit

    from_text = cfg.init_text is not None
    config = PromptTuningConfig(
        task_type=peft_task_type(ctx.task),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=cfg.init_text,
        tokenizer_name_or_path=ctx.model_path if from_text else None,
    )
    return wrap_with_peft(model, config)
