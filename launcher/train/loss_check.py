"""Whether a model's loss can be computed inside its output head (launcher.train.chunked_loss), asked of the model.

Which models: those whose head is a plain Linear and whose own loss is cross-entropy over its
output, plus, for a mixture of experts, the router's load-balancing term (added as the model adds
it, weighted as launcher.train.router_loss says). That is decided by behaviour, not by a list of
config keys a new model may not be on: a tiny twin of the model's architecture (launcher.model.twin:
its class, its config narrowed as for the packing check, random weights) computes its own loss and
the chunked one on a few tokens (`loss_refusal`). The twin is built with the model's class itself,
not from_config, which would partition it under ZeRO-3. A list of config keys (LOGIT_TRANSFORMS)
is only the fallback for an architecture whose twin cannot be built.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.data.formats import IGNORE
from launcher.model.twin import build_twin, twin_config
from launcher.train.chunked_loss import cross_entropy_chunk, head_loss, linear_heads, patch_head
from launcher.train.router_loss import router_aux_coef, text_config

# The twin's logits are spread wide (standard deviation ~5, not ~0.01 as drawn): a soft-cap or a
# scale of the logits changes a loss over near-uniform logits by less than rounding.
TWIN_LOGIT_STD = 5.0
PROBE_RTOL = 1e-4  # float32 sums in another order differ by ~1e-6

# Config attributes of models whose forward changes the logits after the head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, ...). Only a fallback, for an architecture whose twin
# cannot be built: a list knows the transforms of the models it was written for, and no others.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "output_multiplier", "unpadded_vocab_size")


def refusal(model: nn.Module, task: str) -> str | None:
    """Why this model's loss cannot be computed inside its output head, or None if it can: the head
    must be a plain Linear, and the model's own loss cross-entropy over that head's output (plus the
    router's loss of a mixture of experts), as a probe of its architecture finds (loss_refusal)."""
    if task != "causal_lm":
        return "classification models compute their loss from a small pooled head"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    if linear_heads(head) is None:
        return f"the output head is a {type(head).__name__} (adapted or quantized), not a plain Linear"
    return loss_refusal(model)


def loss_refusal(model: nn.Module) -> str | None:
    """Why the model's own loss is not the chunked one (cross-entropy over its output head, plus
    router_loss), judged on a tiny twin of its architecture; None if they agree."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    try:
        return _probe(_twin(base))
    except Exception as err:  # an architecture the shrinking does not fit, or a forward of its own: the config decides
        first_line = (str(err).splitlines() or [""])[0][:100]
        return _config_refusal(base.config, f"no probe ({type(err).__name__}: {first_line})")


def _twin(model: nn.Module) -> nn.Module:
    config = twin_config(model.config)
    for part in {id(c): c for c in (config, text_config(config))}.values():
        if getattr(part, "router_aux_loss_coef", None) is not None:
            part.router_aux_loss_coef = 1.0  # the router's term as large as the tokens' (0.001 hides in rounding)
        part.use_cache = False
    config._attn_implementation = "eager"  # flash-attn kernels, when the model uses them, need a GPU

    def make() -> nn.Module:
        twin = type(model)(config).float().eval()
        head = twin.get_output_embeddings()
        head.weight.data.normal_(0.0, TWIN_LOGIT_STD / head.in_features**0.5)
        return twin

    return build_twin(make)


def _probe(twin: nn.Module) -> str | None:
    head = twin.get_output_embeddings()
    vocab = min(head.out_features, twin.get_input_embeddings().num_embeddings)
    ids = torch.arange(16).reshape(2, 8) * 7919 % vocab  # fixed, spread over the vocabulary
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt: ignored positions must stay out of both losses
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    targets = torch.tensor(float((labels[:, 1:] != IGNORE).sum()))  # one micro batch: router share 1
    coef = router_aux_coef(twin.config)
    with torch.no_grad():
        own = twin(**batch, num_items_in_batch=targets).loss
        if own is None:
            return "the model computes no loss of its own from labels"
        patch_head(twin)
        ours = head_loss(twin, batch, targets, cross_entropy_chunk, coef)
    if abs(float(own) - float(ours)) <= PROBE_RTOL * max(1.0, abs(float(own))):
        return None
    terms = "cross-entropy over its output head" + (" plus router_aux_loss_coef x aux_loss" if coef else "")
    text = text_config(twin.config)
    hints = [f"config.{n}={getattr(text, n)}" for n in LOGIT_TRANSFORMS if getattr(text, n, None) is not None]
    if getattr(text, "output_router_logits", False) and coef is None:
        hints.append("config.output_router_logits with no router_aux_loss_coef")
    return (f"the model's own loss is not {terms} (on a probe batch of a tiny {type(twin).__name__}: "
            f"{float(own):.6g} against {float(ours):.6g}{'; ' + ', '.join(hints) + ' may be why' if hints else ''})")


def _config_refusal(config, why: str) -> str | None:
    """The fallback when no twin could be built: the known logit transforms, and an unverified router loss."""
    configs = [config, text_config(config)]
    for name in LOGIT_TRANSFORMS:
        if any(getattr(c, name, None) is not None for c in configs):
            return f"the model changes its logits after the head (config.{name}; {why})"
    if any(getattr(c, "output_router_logits", False) for c in configs):
        return f"the model adds its router's loss (config.output_router_logits), unverified: {why}"
    return None
