"""Measuring what one micro batch really keeps for backward, for the planner's tests
(tests/test_plan.py) and its benchmark on every shipped recipe (benchmarks/plan_memory.py)."""

from __future__ import annotations

import torch


def kept_for_backward(model, recipe, rows: int, length: int, chunked: bool, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for backward after one micro batch's forward and loss, the
    model's parameters left out: every saved tensor, through saved-tensor hooks, that is still alive
    when the loss is there (a saved tensor whose graph was dropped on the way, as DoRA's norm, is not)."""
    import weakref

    from launcher.train.chunked_loss import causal_lm_loss

    saved = []

    def keep(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    ids = torch.randint(0, 500, (rows, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        if recipe.model.task == "classification":
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, torch.zeros(rows, dtype=torch.long), reduction="sum")
        elif chunked:
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, torch.tensor(float(rows * length)))
        else:
            loss = model(input_ids=ids, labels=ids).loss
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved)
                    if t is not None}
    assert loss.requires_grad
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in weights)


def build_for_fit(recipe):
    """(model as training starts, number of labels, whether the chunked loss is on) of a recipe, in train mode."""
    from launcher.model.sources import materialize
    from launcher.train.build import build_model, load_tokenizer
    from launcher.train.chunked_loss import prepare_chunked_loss

    path = materialize(recipe.model.name)
    labels = ["adjective", "adverb", "noun", "verb"] if recipe.model.task == "classification" else None
    model = build_model(path, recipe, labels, load_tokenizer(path, recipe).pad_token_id, torch.device("cpu"), False)
    chunked = labels is None and prepare_chunked_loss(model, recipe) is None
    return model.train(), 4 if labels else None, chunked
