"""Feature extraction: the pretrained backbone is frozen and only the new classification head trains."""

from launcher.methods.common import MethodContext, freeze_all, unfreeze_head


def apply(model, cfg, ctx: MethodContext):
    freeze_all(model)
    unfreeze_head(model)
    return model
