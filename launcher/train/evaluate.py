"""Evaluation: summed loss and target counts (and a confusion matrix) reduced over ranks.

Each rank evaluates the examples i with i % world_size == rank. Sums, not means, are reduced,
so the result is exactly the full-data metric whatever the world size; the confusion matrix
gives accuracy and macro precision/recall/F1 from one all-reduce.
"""

from __future__ import annotations

import math

import torch

from launcher.data.batches import collate, count_targets
from launcher.train.step import micro_batch_loss


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 from confusion[true, predicted].

    Macro averages follow scikit-learn (average="macro", zero_division=0): over the classes that
    occur in the truth or the predictions of this eval set. A class absent from both says nothing
    about the model; counting it as 0 would cap a perfect model at (K-1)/K.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    precision = true_positive / predicted.clamp(min=1)  # 0 where never predicted (tp is 0 there too)
    recall = true_positive / actual.clamp(min=1)  # 0 where never true
    # 2tp / (2tp + fp + fn): the harmonic mean of precision and recall, defined for every present class.
    f1 = 2 * true_positive / (predicted + actual).clamp(min=1)
    return {
        "accuracy": float(true_positive.sum() / confusion.sum()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }


@torch.no_grad()
def evaluate(model, dataset, *, accelerator, batch_size: int, pad_token_id: int, num_labels: int | None,
             forwards_are_collective: bool = True) -> dict[str, float]:
    from launcher.outputs.progress import progress_bar

    was_training = model.training
    model.eval()
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    targets = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    confusion = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.long, device=accelerator.device)
    # Every rank runs the same number of forward passes where each forward is a collective (sharded
    # parameters not gathered for inference): a rank with fewer examples runs a filler batch and ignores it.
    per_rank = -(-len(dataset) // accelerator.num_processes)
    progress = progress_bar(-(-per_rank // batch_size), "evaluating", enabled=accelerator.is_main_process,
                            unit="batches", leave=False, every_percent=None)
    for start in range(0, per_rank, batch_size):
        progress.update(1)
        chunk = indices[start : start + batch_size]
        if not chunk and not forwards_are_collective:
            break  # whole weights on every rank: no filler forward to keep in step with
        batch = collate(dataset.select(chunk or [0]), pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if not chunk:
            if forwards_are_collective:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            continue
        n = count_targets(batch["labels"])
        if num_labels:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
            pairs = batch["labels"] * num_labels + logits.argmax(-1)
            confusion += torch.bincount(pairs, minlength=num_labels * num_labels).view(num_labels, num_labels)
        else:
            # A normaliser of 1: the sum over predicted tokens, chunked like training's (no full logits).
            loss_sum += micro_batch_loss(model, batch, torch.ones((), device=accelerator.device), False).double()
        targets += n
    progress.close()
    stacked = torch.cat([loss_sum.view(1), targets.view(1)])
    stacked = accelerator.reduce(stacked, reduction="sum")
    confusion = accelerator.reduce(confusion, reduction="sum")
    model.train(was_training)
    eval_loss = float(stacked[0] / stacked[1].clamp(min=1))
    metrics = {"eval_loss": eval_loss}
    if num_labels:
        metrics.update(classification_metrics(confusion))
    else:
        metrics["perplexity"] = math.exp(min(eval_loss, 50.0))
    return metrics


HIGHER_IS_BETTER = {"accuracy", "precision", "recall", "f1"}


def improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best
