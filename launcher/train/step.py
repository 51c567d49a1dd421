"""One optimizer step: the micro batches of this rank, their losses and gradients, the update.

Loss normalisation: each optimizer step minimises the mean loss over every target (token, or
example for classification) of the global batch. The target count is summed over all micro
batches and ranks first; each micro batch then contributes sum(loss) * world_size / count,
because every backend averages gradients over ranks. So the update is the same whether the
global batch is split as 4x1x1, 2x2x1 or 1x2x2 (micro batch x accumulation x world size), which
a plain mean per micro batch would break whenever micro batches hold different numbers of tokens.

Which examples a step uses is a function of (seed, step) (launcher.data.batches), and which
micro batch synchronises gradients is decided here, from the current split: so a run resumed
with another micro batch or world size continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from launcher.data.loader import StepBatches

if TYPE_CHECKING:
    from launcher.train.build import Run


@dataclass
class StepResult:
    loss: float  # mean loss per target over the global batch
    tokens: int  # non-padding tokens over all ranks
    slots: int  # positions fed to the model over all ranks (tokens + padding)
    attention_pairs: int  # query-key pairs within examples over all ranks (for model FLOPs)
    grad_norm: float | None
    seconds: float


def micro_batch_loss(model, batch: dict, normalizer: torch.Tensor, classification: bool,
                     teacher=None) -> torch.Tensor:
    if teacher is not None:  # distill: the task loss mixed with the teacher's soft targets
        from launcher.train.distill import distillation_loss

        return distillation_loss(model, teacher, batch, normalizer, classification)
    if classification:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum") / normalizer
    from launcher.train.chunked_loss import causal_lm_loss, chunked_loss_prepared
    from launcher.train.router_loss import model_loss

    if chunked_loss_prepared(model):  # the head computes the loss chunk by chunk (train.chunked_loss)
        return causal_lm_loss(model, batch, normalizer)
    # transformers sums the token losses and divides by num_items_in_batch (peft prepends ignored
    # labels for virtual tokens, so prompt and prefix tuning count the same targets); a mixture of
    # experts' router term is weighted as the chunked path weighs it (launcher.train.router_loss).
    return model_loss(model, batch, normalizer)


def train_step(run: Run, step: int, fed: StepBatches) -> StepResult:
    """Run optimizer step `step` (1-based) on every rank from its fed micro batches; the schedule advances once."""
    acc, backend = run.accelerator, run.backend
    started = time.perf_counter()
    local = torch.tensor([fed.targets, fed.tokens, fed.slots, fed.attention_pairs], dtype=torch.float64,
                         device=acc.device)
    targets, tokens, slots, pairs = acc.reduce(local.clone(), reduction="sum").tolist()
    normalizer = torch.tensor(max(targets, 1.0) / acc.num_processes, device=acc.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    classification = run.num_labels is not None
    for i, batch in enumerate(fed.batches):
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
        backend.sync_gradients(acc, run.model, sync=i == len(fed.batches) - 1)  # before the forward: DDP reads it there
        loss = micro_batch_loss(run.model, batch, normalizer, classification, run.teacher)
        backend.backward(acc, loss)
        loss_sum += loss.detach().double() * normalizer
    grad_norm = backend.optimizer_step(acc, run.model, run.optimizer, run.recipe.train.max_grad_norm)
    run.scheduler.step()
    loss = float(acc.reduce(loss_sum, reduction="sum")) / max(targets, 1.0)
    return StepResult(loss=loss, tokens=int(tokens), slots=int(slots), attention_pairs=int(pairs), grad_norm=grad_norm,
                      seconds=time.perf_counter() - started)
