"""Causal-LM cross-entropy a chunk of tokens at a time, without the logits of the whole micro batch.

Why: the standard loss materialises the logits of every position at once, and autograd keeps them
until backward: for SmolLM2 (vocab 49152) a micro batch of 8 x 512 tokens holds 805 MB of float32
logits, more than the model's weights, plus their half-precision copy and the softmax gradient.

How: `LinearCrossEntropy` runs the head and the float32 softmax one chunk of tokens at a time and,
in the forward pass itself, computes the gradients with respect to the hidden states (and to the
head's weight and bias when they train); backward only scales them by grad_output. That is the idea
of Liger-Kernel's fused linear cross-entropy, here in plain torch. One chunk's logits are about the
size of the hidden states (`chunk_tokens`). Positions whose label is ignored are skipped entirely.

Where: inside the output head's own forward, so that every distributed wrapper sees the calls it
expects: the top model is still called (DDP's reducer, DeepSpeed's engine, FSDP2's root hooks) and
the head is still called as a module, where ZeRO-3 gathers its weight (FSDP2 gathers it with the
root's parameters). `prepare_chunked_loss` replaces the head module's *instance* forward (so no
parameter name changes); while labels are pending (`pending_labels`, set around one model call by
`causal_lm_loss`) it returns the summed loss instead of logits. The model is called without labels,
so transformers computes no loss of its own, and the loss comes back as `output.logits`. What is
summed per chunk is a `ChunkObjective`: cross-entropy, or distillation's (launcher.train.distill).

Which models: those whose head is a plain Linear and whose own loss is cross-entropy over its
output, plus, for a mixture of experts, the router's load-balancing term (added here as the model
adds it, weighted as `router_loss` says). That is decided by behaviour, on a tiny twin of the
architecture (`loss_refusal`), not by a list of config keys a new model may not be on.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from launcher.data.formats import IGNORE

# Set on the model prepare_chunked_loss patched; micro_batch_loss looks for it (through DDP's .module).
MARK = "tunefleet_chunked_loss"

# Each chunk reads the whole head weight twice (logits, then the hidden states' gradient): chunks of
# a few dozen tokens make those matmuls memory-bound, ~2x slower than the standard loss on CPU
# (benchmarks/chunked_loss.md). From 256 tokens on they are near full speed, and 256 tokens of
# logits stay small (50 MB for a 49k vocabulary, 156 MB for 152k).
MIN_CHUNK_TOKENS = 256


def chunk_tokens(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk: the power of two at or above num_tokens / ceil(vocab / hidden), so that one
    chunk's logits (chunk x vocab) are about the size of the hidden states (num_tokens x hidden),
    but at least MIN_CHUNK_TOKENS. The memory planner uses this too."""
    chunks = math.ceil(vocab_size / hidden_size)
    wanted = max(1, math.ceil(num_tokens / chunks))
    return max(1 << (wanted - 1).bit_length(), MIN_CHUNK_TOKENS)


# The loss of one chunk: (float32 logits (c, V) the function may overwrite, their row indices into the
# flattened positions, their targets (c), whether the gradient is wanted) -> (summed float32 loss, the
# gradient of that sum with respect to the logits, in float32 (c, V), or None). The gradient may be
# written in place of the logits: no second chunk of logits is needed.
ChunkObjective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def cross_entropy_chunk(logits: torch.Tensor, index: torch.Tensor, target: torch.Tensor,
                        want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk of logits, the gradient in their place (a ChunkObjective)."""
    picked = logits.gather(1, target[:, None]).squeeze(1)
    # log-sum-exp by hand, in place of the logits: torch.logsumexp would hold a second chunk of
    # exponentials, and the gradient needs them anyway.
    top = logits.amax(dim=1, keepdim=True)
    exps = logits.sub_(top).exp_()
    total = exps.sum(dim=1, keepdim=True)
    loss = (top + total.log()).squeeze(1).sub_(picked).sum()
    if not want_grad:
        return loss, None
    # d(sum of losses)/d(logits) = softmax - one_hot(target).
    grad = exps.div_(total)
    grad[torch.arange(target.numel(), device=grad.device), target] -= 1.0
    return loss, grad


def _loss_and_grads(hidden, weight, bias, labels, dtype, chunk, want_hidden, want_weight, want_bias,
                    objective: ChunkObjective = cross_entropy_chunk):
    """The summed `objective` over the rows of (hidden @ weight.T + bias) whose label is not ignored,
    and the wanted gradients of that sum (None where not wanted), each in its input's dtype. The
    matmuls run in `dtype`, the objective in float32, as transformers' loss does (its logits.float()).
    Without a weight, `hidden` are logits a head already computed (they are read a chunk at a time)."""
    rows = (labels != IGNORE).nonzero().squeeze(1)
    weight_c = weight.to(dtype) if weight is not None else None
    bias_c = bias.to(dtype) if bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
    want_grad = want_hidden or want_weight or want_bias
    for start in range(0, rows.numel(), chunk):
        logits = grad = None  # the previous chunk's buffers go before the next matmul allocates
        index = rows[start : start + chunk]
        x = hidden.index_select(0, index).to(dtype)
        if weight_c is None:
            logits = x.float()
        else:
            logits = (torch.addmm(bias_c, x, weight_c.t()) if bias_c is not None else x @ weight_c.t()).float()
        part, grad = objective(logits, index, labels.index_select(0, index), want_grad)
        loss += part
        if grad is None:
            continue
        grad = grad.to(dtype)  # as autograd casts the gradient back through logits.float()
        if want_hidden:
            grad_hidden.index_copy_(0, index, (grad @ weight_c if weight_c is not None else grad).to(hidden.dtype))
        if want_weight:  # accumulated over chunks in float32
            if dtype == torch.float32:
                grad_weight.addmm_(grad.t(), x)
            else:
                grad_weight += grad.t() @ x
        if want_bias:
            grad_bias += grad.float().sum(0)
    return (loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed loss of a linear head, chunk by chunk; the gradients are computed in forward.

    hidden (N, H), weight (V, H) or None (hidden are then the logits), bias (V) or None, labels (N)
    already shifted (position t holds the token at t+1; IGNORE where nothing is predicted); the
    objective is cross-entropy unless another is given. Backward may run once (the saved gradients
    are scaled in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, chunk, objective):
        want = ctx.needs_input_grad
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen by the caller
            loss, *grads = _loss_and_grads(hidden, weight, bias, labels, dtype, chunk, want[0],
                                           weight is not None and want[1], bias is not None and want[2], objective)
        ctx.save_for_backward(*grads)
        ctx.spent = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.spent:
            raise RuntimeError("the chunked loss was backpropagated twice (it keeps its gradients, not the logits)")
        ctx.spent = True
        # A 0-dim float32 factor keeps each gradient's dtype but multiplies in float32.
        grads = [g.mul_(grad_output) if g is not None else None for g in ctx.saved_tensors]
        return *grads, None, None, None, None


def _chunked(flat, weight, bias, labels, dtype, chunk, objective):
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (flat, weight, bias))
    if not tracked:  # evaluation: the loss alone
        return _loss_and_grads(flat, weight, bias, labels, dtype, chunk, False, False, False, objective)[0]
    return LinearCrossEntropy.apply(flat, weight, bias, labels, dtype, chunk, objective)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, objective: ChunkObjective = cross_entropy_chunk) -> torch.Tensor:
    """Summed cross-entropy (or `objective`) of `hidden @ weight.T (+ bias)` (any leading shape)
    against shifted `labels`.

    The matmuls run in the dtype F.linear would use here: autocast's where it is on, else the
    promoted dtype of hidden and weight; the softmax in float32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(hidden.device)
    chunk = chunk_tokens(flat.shape[0], weight.shape[0], weight.shape[1])
    return _chunked(flat, weight, bias, labels, dtype, chunk, objective)


def logits_loss(logits: torch.Tensor, labels: torch.Tensor, objective: ChunkObjective) -> torch.Tensor:
    """The summed `objective` of logits a head already computed (any leading shape) against shifted
    `labels`, MIN_CHUNK_TOKENS rows at a time: the gradient (in the logits' dtype) is the only other
    full-vocabulary tensor; no float32 copy of the logits or of their softmax is made."""
    flat, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    return _chunked(flat, None, None, labels, logits.dtype, MIN_CHUNK_TOKENS, objective)


# ---------------------------------------------------------------------------- the head's forward


@dataclass
class _Pending:
    labels: torch.Tensor | None = None  # unshifted, as in the batch
    objective: ChunkObjective = cross_entropy_chunk  # what the head sums over the label rows
    calls: int = 0  # how many head calls used them (must be exactly one per model call)


_pending = _Pending()


@contextlib.contextmanager
def pending_labels(labels: torch.Tensor, objective: ChunkObjective = cross_entropy_chunk):
    """While inside, a patched head returns the summed loss (cross-entropy, or `objective`) against
    `labels` instead of logits."""
    _pending.labels, _pending.objective, _pending.calls = labels, objective, 0
    try:
        yield _pending
    finally:
        _pending.labels, _pending.objective = None, cross_entropy_chunk


def _head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """The instance forward prepare_chunked_loss gives the output head (a plain nn.Linear)."""
    labels = _pending.labels
    if labels is None:
        return type(self).forward(self, hidden)
    _pending.calls += 1
    extra = hidden.shape[-2] - labels.shape[-1]
    if extra < 0:
        raise RuntimeError(f"chunked loss: {hidden.shape[-2]} hidden positions but {labels.shape[-1]} labels")
    # Prompt tuning prepends virtual tokens to the hidden states: they predict nothing. Padding before
    # shifting keeps transformers' meaning (peft pads the unshifted labels the same way).
    labels = nn.functional.pad(labels.to(hidden.device), (extra, 1), value=IGNORE)[..., 1:]
    return linear_cross_entropy(hidden, self.weight, self.bias, labels, _pending.objective)


def _linear_heads(head: nn.Module) -> list[nn.Linear] | None:
    """The plain Linear modules that compute the head's output, or None if it is something else."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):  # peft.modules_to_save: a trainable copy beside the original
        modules = [head.original_module, *head.modules_to_save.values()]
    else:
        modules = [head]
    return modules if all(type(m) is nn.Linear for m in modules) else None


def patch_head(model: nn.Module) -> None:
    """Give the model's output head (a plain Linear, or peft's copies of one) the loss-computing forward."""
    for linear in _linear_heads(model.get_output_embeddings()):
        # A bound method (not a closure): deepcopy rebinds it to the copied module.
        linear.forward = types.MethodType(_head_forward, linear)


@dataclass(frozen=True)
class ChunkedLoss:
    """What prepare_chunked_loss leaves on the model it patched (under MARK)."""

    router_aux_loss_coef: float | None  # MoE: the weight of the router's loss in the model's own, else None


def refusal(model: nn.Module, task: str) -> str | None:
    """Why this model's loss cannot be computed inside its output head, or None if it can: the head
    must be a plain Linear, and the model's own loss cross-entropy over that head's output (plus the
    router's loss of a mixture of experts), as a probe of its architecture finds (loss_refusal)."""
    if task != "causal_lm":
        return "classification models compute their loss from a small pooled head"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    if _linear_heads(head) is None:
        return f"the output head is a {type(head).__name__} (adapted or quantized), not a plain Linear"
    return loss_refusal(model)


def prepare_chunked_loss(model: nn.Module, recipe) -> str | None:
    """Make `model`'s output head compute the loss while labels are pending (before the backend wraps
    the model). Returns None when the chunked loss is on, else the reason it is not."""
    if not recipe.train.chunked_loss:
        return "train.chunked_loss=false"
    reason = refusal(model, recipe.model.task)
    if reason:
        return reason
    patch_head(model)
    setattr(model, MARK, ChunkedLoss(router_aux_loss_coef=router_aux_coef(model.config)))
    return None


def chunked_loss_state(model: nn.Module) -> ChunkedLoss | None:
    """What prepare_chunked_loss left on this model, or None if it did not patch it, looking through
    DDP's .module (DeepSpeed's engine and FSDP2 expose the model's attributes themselves)."""
    while not hasattr(model, MARK):
        model = getattr(model, "module", None)
        if not isinstance(model, nn.Module):
            return None
    return getattr(model, MARK)


def chunked_loss_prepared(model: nn.Module) -> bool:
    return chunked_loss_state(model) is not None


def causal_lm_loss(model: nn.Module, batch: dict, normalizer: torch.Tensor,
                   objective: ChunkObjective = cross_entropy_chunk) -> torch.Tensor:
    """sum of the micro batch's token losses / normalizer, as `model(**batch, num_items_in_batch=
    normalizer).loss` gives it, computed by the patched head (with `objective` in place of cross-entropy
    if given), plus the router's loss of a mixture of experts while it trains (router_loss). Every key
    but labels goes to the model."""
    coef = chunked_loss_state(model).router_aux_loss_coef if model.training else None
    return _head_loss(model, batch, normalizer, objective, coef)


def _head_loss(model, batch, normalizer, objective, router_coef):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pending_labels(batch["labels"], objective) as pending:
        output = model(**inputs)
    loss = output.logits
    if pending.calls != 1 or loss.ndim != 0:
        raise RuntimeError(f"chunked loss: the output head computed the loss {pending.calls} times in one forward "
                           f"(output of shape {tuple(loss.shape)}); set train.chunked_loss=false for this model")
    loss = loss / normalizer
    router = router_loss(output, router_coef, batch["labels"], normalizer)
    return loss if router is None else loss + router


# ---------------------------------------------------------------------------- the router's loss (MoE)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def router_aux_coef(config) -> float | None:
    """The weight a mixture of experts gives its router's load-balancing loss in its own loss: Mixtral,
    Qwen2/3-MoE, OLMoE, ... add router_aux_loss_coef x aux_loss when config.output_router_logits is on.
    None when the loss has no such term."""
    text = _text_config(config)
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


# ---------------------------------------------------------------------------- the probe


# A probe decides by behaviour what a list of config attributes could only guess: a tiny twin of the
# model's architecture (its class, its config narrowed as the packing check narrows it, random
# weights) computes its own loss and the chunked one on a few tokens. A twin, not the model: under
# lean loading (FSDP) other ranks hold the model on the meta device, ZeRO-3 partitions its weights,
# QLoRA's sit on a GPU; a twin gives every rank the same answer in milliseconds. Built with the
# model's class itself, not from_config, which would partition it under ZeRO-3.
# The twin's logits are spread wide (standard deviation ~5, not ~0.01 as drawn): a soft-cap or a
# scale of the logits changes a loss over near-uniform logits by less than rounding.
TWIN_LOGIT_STD = 5.0
PROBE_RTOL = 1e-4  # float32 sums in another order differ by ~1e-6

# Config attributes of models whose forward changes the logits after the head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, ...). Only a fallback, for an architecture whose twin
# cannot be built: a list knows the transforms of the models it was written for, and no others.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "output_multiplier", "unpadded_vocab_size")


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
    from launcher.data.packing_check import MAX_TWIN_PARAMETERS, twin_config

    config = twin_config(model.config)
    for part in {id(c): c for c in (config, _text_config(config))}.values():
        if getattr(part, "router_aux_loss_coef", None) is not None:
            part.router_aux_loss_coef = 1.0  # the router's term as large as the tokens' (0.001 hides in rounding)
        part.use_cache = False
    config._attn_implementation = "eager"  # flash-attn kernels, when the model uses them, need a GPU
    with torch.device("meta"):
        size = sum(p.numel() for p in type(model)(config).parameters())
    if size > MAX_TWIN_PARAMETERS:
        raise ValueError(f"the twin would have {size:,} parameters")
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # the run's random draws stay as they were
        torch.manual_seed(0)
        twin = type(model)(config).float().eval()
        head = twin.get_output_embeddings()
        head.weight.data.normal_(0.0, TWIN_LOGIT_STD / head.in_features**0.5)
    return twin


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
        ours = _head_loss(twin, batch, targets, cross_entropy_chunk, coef)
    if abs(float(own) - float(ours)) <= PROBE_RTOL * max(1.0, abs(float(own))):
        return None
    terms = "cross-entropy over its output head" + (" plus router_aux_loss_coef x aux_loss" if coef else "")
    text = _text_config(twin.config)
    hints = [f"config.{n}={getattr(text, n)}" for n in LOGIT_TRANSFORMS if getattr(text, n, None) is not None]
    if getattr(text, "output_router_logits", False) and coef is None:
        hints.append("config.output_router_logits with no router_aux_loss_coef")
    return (f"the model's own loss is not {terms} (on a probe batch of a tiny {type(twin).__name__}: "
            f"{float(own):.6g} against {float(ours):.6g}{'; ' + ', '.join(hints) + ' may be why' if hints else ''})")


def _config_refusal(config, why: str) -> str | None:
    """The fallback when no twin could be built: the known logit transforms, and an unverified router loss."""
    configs = [config, _text_config(config)]
    for name in LOGIT_TRANSFORMS:
        if any(getattr(c, name, None) is not None for c in configs):
            return f"the model changes its logits after the head (config.{name}; {why})"
    if any(getattr(c, "output_router_logits", False) for c in configs):
        return f"the model adds its router's loss (config.output_router_logits), unverified: {why}"
    return None
