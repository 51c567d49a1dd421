"""Fine-tuning methods: one module each, chosen from this explicit table (never by string import).

Every module has `apply(model, cfg, ctx) -> model`, which marks what trains (or wraps the model
with a peft adapter). A module may also have `load_kwargs(cfg, device, task, settings) -> dict`, extra
`from_pretrained` arguments (QLoRA quantizes while loading).
"""

from launcher.methods import dora, full, head_only, ia3, lora, partial_freeze, prefix_tuning, prompt_tuning, qlora

METHODS = {
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "prompt_tuning": prompt_tuning,
    "prefix_tuning": prefix_tuning,
    "ia3": ia3,
    "partial_freeze": partial_freeze,
    "full": full,
    "head_only": head_only,
}
