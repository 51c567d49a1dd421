"""The router's load-balancing term of a mixture of experts, weighted alike on the chunked and the unchunked path.

Mixtral, Qwen2/3-MoE, OLMoE, ... add router_aux_loss_coef x aux_loss to their own loss when
config.output_router_logits is on. The chunked loss (launcher.train.chunked_loss) adds it as the
model does; the unchunked one (`model_loss`) takes the model's own loss and reweights that term.
Both weight it by the micro batch's share of the step's targets (`router_loss` says why).
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.data.formats import IGNORE


def text_config(config):
    """The config of the language model inside (a multimodal config's text part), else `config`."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def router_aux_coef(config) -> float | None:
    """The weight a mixture of experts gives its router's load-balancing loss in its own loss: Mixtral,
    Qwen2/3-MoE, OLMoE, ... add router_aux_loss_coef x aux_loss when config.output_router_logits is on.
    None when the loss has no such term."""
    text = text_config(config)
    coef = getattr(text, "router_aux_loss_coef", None)
    return float(coef) if getattr(text, "output_router_logits", False) and coef is not None else None


def router_loss(output, coef: float | None, labels: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor | None:
    """coef x the router loss the model returned (output.aux_loss), weighted by this micro batch's share
    of the step's targets (its targets / normalizer); None without a router term.

    Why the share: the model's own loss adds coef x aux_loss once per call, so the router's weight
    would grow with the micro batches of a step (accumulation, ranks), while launcher.train.step makes
    the cross-entropy one mean over the step's targets whatever the split. Weighted by share, one
    optimizer step adds coef x (the target-weighted mean of the micro batches' aux_loss) once; a
    single micro batch holding every target of the step adds exactly what the model's own loss adds.
    """
    aux = getattr(output, "aux_loss", None)
    if coef is None or aux is None:
        return None
    share = (labels[..., 1:] != IGNORE).sum().to(normalizer.device) / normalizer
    return coef * aux.to(normalizer.device) * share


def model_loss(model: nn.Module, batch: dict, normalizer: torch.Tensor) -> torch.Tensor:
    """The unchunked loss: the model's own `model(**batch, num_items_in_batch=normalizer).loss`, with a
    mixture of experts' router term weighted as router_loss says (while training; none in evaluation)."""
    output = model(**batch, num_items_in_batch=normalizer)
    coef = router_aux_coef(config_of(model))
    aux = getattr(output, "aux_loss", None)
    if coef is None or aux is None:
        return output.loss
    kept = router_loss(output, coef, batch["labels"], normalizer) if model.training else 0.0
    return output.loss - coef * aux.to(output.loss.device) + kept


def config_of(model: nn.Module):
    """The transformers config under DDP's and DeepSpeed's .module (whose engine has a .config of its
    own, the DeepSpeed one); peft and FSDP2 pass .config through."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "config", None)
