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
adds it, weighted as launcher.train.router_loss says); launcher.train.loss_check decides that on a
tiny twin of the architecture.
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
from launcher.train.router_loss import router_aux_coef, router_loss

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


def linear_heads(head: nn.Module) -> list[nn.Linear] | None:
    """The plain Linear modules that compute the head's output, or None if it is something else."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):  # peft.modules_to_save: a trainable copy beside the original
        modules = [head.original_module, *head.modules_to_save.values()]
    else:
        modules = [head]
    return modules if all(type(m) is nn.Linear for m in modules) else None


def patch_head(model: nn.Module) -> None:
    """Give the model's output head (a plain Linear, or peft's copies of one) the loss-computing forward."""
    for linear in linear_heads(model.get_output_embeddings()):
        # A bound method (not a closure): deepcopy rebinds it to the copied module.
        linear.forward = types.MethodType(_head_forward, linear)


@dataclass(frozen=True)
class ChunkedLoss:
    """What prepare_chunked_loss leaves on the model it patched (under MARK)."""

    router_aux_loss_coef: float | None  # MoE: the weight of the router's loss in the model's own, else None


def prepare_chunked_loss(model: nn.Module, recipe) -> str | None:
    """Make `model`'s output head compute the loss while labels are pending (before the backend wraps
    the model). Returns None when the chunked loss is on, else the reason it is not."""
    # Imported here, not at the top: loss_check imports this module (it runs the patched head on a twin).
    from launcher.train.loss_check import refusal

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
    return head_loss(model, batch, normalizer, objective, coef)


def head_loss(model: nn.Module, batch: dict, normalizer: torch.Tensor, objective: ChunkObjective,
              router_coef: float | None) -> torch.Tensor:
    """causal_lm_loss with the router term's weight given (None: none) instead of read from what
    prepare_chunked_loss left: launcher.train.loss_check runs it on a twin it patched itself."""
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
