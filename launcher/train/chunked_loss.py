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
so transformers computes no loss of its own, and the loss comes back as `output.logits`.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass

import torch
from torch import nn

from launcher.data.formats import IGNORE

# Set on the model prepare_chunked_loss patched; micro_batch_loss looks for it (through DDP's .module).
MARK = "tunefleet_chunked_loss"

# Config attributes of models whose forward changes the logits after the head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, ...): the head's loss would miss that step.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "output_multiplier", "unpadded_vocab_size")


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


def _loss_and_grads(hidden, weight, bias, labels, dtype, chunk, want_hidden, want_weight, want_bias):
    """Summed cross-entropy of (hidden @ weight.T + bias) against `labels` (N), and the wanted gradients
    of that sum (None where not wanted), each in its input's dtype. The matmuls run in `dtype`, the
    softmax in float32, as transformers' loss does (its logits.float())."""
    rows = (labels != IGNORE).nonzero().squeeze(1)
    weight_c = weight.to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
    for start in range(0, rows.numel(), chunk):
        logits = exps = grad = None  # the previous chunk's buffers go before the next matmul allocates
        index = rows[start : start + chunk]
        x = hidden.index_select(0, index).to(dtype)
        target = labels.index_select(0, index)
        logits = (torch.addmm(bias_c, x, weight_c.t()) if bias_c is not None else x @ weight_c.t()).float()
        picked = logits.gather(1, target[:, None]).squeeze(1)
        # log-sum-exp by hand, in place of the logits: torch.logsumexp would hold a second chunk of
        # exponentials, and the gradient needs them anyway.
        top = logits.amax(dim=1, keepdim=True)
        exps = logits.sub_(top).exp_()
        total = exps.sum(dim=1, keepdim=True)
        loss += (top + total.log()).squeeze(1).sub_(picked).sum()
        if not (want_hidden or want_weight or want_bias):
            continue
        # d(sum of losses)/d(logits) = softmax - one_hot(target).
        grad = exps.div_(total)
        grad[torch.arange(index.numel(), device=grad.device), target] -= 1.0
        grad = grad.to(dtype)  # as autograd casts the gradient back through logits.float()
        if want_hidden:
            grad_hidden.index_copy_(0, index, (grad @ weight_c).to(hidden.dtype))
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
    """Summed cross-entropy of a linear head, chunk by chunk; the gradients are computed in forward.

    hidden (N, H), weight (V, H), bias (V) or None, labels (N) already shifted (position t holds
    the token at t+1; IGNORE where nothing is predicted). Backward may run once (the saved gradients
    are scaled in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, chunk):
        want = ctx.needs_input_grad
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen by the caller
            loss, *grads = _loss_and_grads(hidden, weight, bias, labels, dtype, chunk,
                                           want[0], want[1], bias is not None and want[2])
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
        return *grads, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` (any leading shape) against shifted `labels`.

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
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not tracked:  # evaluation: the loss alone
        return _loss_and_grads(flat, weight, bias, labels, dtype, chunk, False, False, False)[0]
    return LinearCrossEntropy.apply(flat, weight, bias, labels, dtype, chunk)


# ---------------------------------------------------------------------------- the head's forward


@dataclass
class _Pending:
    labels: torch.Tensor | None = None  # unshifted, as in the batch
    calls: int = 0  # how many head calls used them (must be exactly one per model call)


_pending = _Pending()


@contextlib.contextmanager
def pending_labels(labels: torch.Tensor):
    """While inside, a patched head returns the summed loss against `labels` instead of logits."""
    _pending.labels, _pending.calls = labels, 0
    try:
        yield _pending
    finally:
        _pending.labels = None


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
    return linear_cross_entropy(hidden, self.weight, self.bias, labels)


def _linear_heads(head: nn.Module) -> list[nn.Linear] | None:
    """The plain Linear modules that compute the head's output, or None if it is something else."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):  # peft.modules_to_save: a trainable copy beside the original
        modules = [head.original_module, *head.modules_to_save.values()]
    else:
        modules = [head]
    return modules if all(type(m) is nn.Linear for m in modules) else None


def refusal(model: nn.Module, task: str) -> str | None:
    """Why this model's loss cannot be computed inside its output head, or None if it can."""
    if task != "causal_lm":
        return "classification models compute their loss from a small pooled head"
    config = getattr(model, "config", None)
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for name in LOGIT_TRANSFORMS:
        if any(getattr(c, name, None) is not None for c in configs):
            return f"the model changes its logits after the head (config.{name})"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    if _linear_heads(head) is None:
        return f"the output head is a {type(head).__name__} (adapted or quantized), not a plain Linear"
    return None


def prepare_chunked_loss(model: nn.Module, recipe) -> str | None:
    """Make `model`'s output head compute the loss while labels are pending (before the backend wraps
    the model). Returns None when the chunked loss is on, else the reason it is not."""
    if not recipe.train.chunked_loss:
        return "train.chunked_loss=false"
    reason = refusal(model, recipe.model.task)
    if reason:
        return reason
    for linear in _linear_heads(model.get_output_embeddings()):
        # A bound method (not a closure): deepcopy rebinds it to the copied module.
        linear.forward = types.MethodType(_head_forward, linear)
    setattr(model, MARK, True)
    return None


def chunked_loss_prepared(model: nn.Module) -> bool:
    """Whether prepare_chunked_loss patched this model, looking through DDP's .module (DeepSpeed's
    engine and FSDP2 expose the model's attributes themselves)."""
    while not hasattr(model, MARK):
        model = getattr(model, "module", None)
        if not isinstance(model, nn.Module):
            return False
    return True


def causal_lm_loss(model: nn.Module, batch: dict, normalizer: torch.Tensor) -> torch.Tensor:
    """sum of the micro batch's token losses / normalizer, as `model(**batch, num_items_in_batch=
    normalizer).loss` gives it, computed by the patched head. Every key but labels goes to the model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pending_labels(batch["labels"]) as pending:
        loss = model(**inputs).logits
    if pending.calls != 1 or loss.ndim != 0:
        raise RuntimeError(f"chunked loss: the output head computed the loss {pending.calls} times in one forward "
                           f"(output of shape {tuple(loss.shape)}); set train.chunked_loss=false for this model")
    return loss / normalizer
