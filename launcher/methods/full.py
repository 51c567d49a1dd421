"""Full fine-tuning: every parameter trains."""

from launcher.methods.common import MethodContext


def apply(model, cfg, ctx: MethodContext):
    for param in model.parameters():
        param.requires_grad_(True)
    return model
