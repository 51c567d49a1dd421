"""Partial freezing: train the last N transformer blocks and/or parameters matching name patterns.

The final norm is trained with the last blocks since it shapes their output. A classification
head is new, so it always trains. The tied input/output embedding is not trained unless a
pattern asks for it (it is large, and moving it changes every token's representation).
"""

from launcher.errors import UserError
from launcher.methods.common import (
    MethodContext,
    freeze_all,
    layer_index_by_param,
    transformer_layers,
    unfreeze_head,
    unfreeze_matching,
)

FINAL_NORM_PATTERNS = [r"(^|\.)norm\.", r"final_layer_norm", r"(^|\.)ln_f\."]


def apply(model, cfg, ctx: MethodContext):
    freeze_all(model)
    if cfg.train_last_n_layers:
        num_layers = len(transformer_layers(model))
        if cfg.train_last_n_layers > num_layers:
            raise UserError(f"peft.train_last_n_layers={cfg.train_last_n_layers} but the model has {num_layers} layers")
        first = num_layers - cfg.train_last_n_layers
        for name, index in layer_index_by_param(model).items():
            if index >= first:
                model.get_parameter(name).requires_grad_(True)
        unfreeze_matching(model, FINAL_NORM_PATTERNS)
    if cfg.train_patterns and not unfreeze_matching(model, cfg.train_patterns):
        raise UserError(f"peft.train_patterns {cfg.train_patterns} match no parameter name of this model")
    if ctx.task == "classification":
        unfreeze_head(model)
    return model
