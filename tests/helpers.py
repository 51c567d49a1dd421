"""Shared test helpers: run a shipped recipe in this process on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Small, fast settings layered over any shipped recipe.
QUICK = ["train.max_steps=4", "eval.every_steps=2", "data.max_eval_samples=16", "data.max_samples=200"]


def tiny_for(recipe_name: str, tiny_llama: Path, tiny_bert: Path, request=None) -> Path:
    """The tiny model standing in for a shipped recipe's model: a BERT for classification, else a llama.
    A classifier that teaches its own cut student (distill.teacher null) must have a trained head: the
    `tiny_bert_classifier` fixture, through pytest's `request`."""
    from launcher.config.load import load_recipe

    recipe = load_recipe([f"recipe={recipe_name}"])[1]
    if recipe.model.task != "classification":
        return tiny_llama
    if recipe.distill and recipe.distill.teacher is None and request is not None:
        return request.getfixturevalue("tiny_bert_classifier")
    return tiny_bert


def tiny_words(recipe_name: str) -> list[str]:
    """Overrides a shipped recipe needs on the 2-block tiny models: blocks a cut student keeps must exist."""
    from launcher.config.load import load_recipe

    distill = load_recipe([f"recipe={recipe_name}"])[1].distill
    return ["distill.student_layers=[0]"] if distill and isinstance(distill.student_layers, list) else []


def run_in_process(recipe_name: str, model: Path, out: Path, *overrides: str, teardown: bool = True):
    """Build and train like launcher/run.py does, but return the live Run for inspection."""
    from launcher.config.load import load_recipe
    from launcher.train.build import build_run
    from launcher.train.loop import release, train_steps

    words = [f"recipe={recipe_name}", f"model.name={model}", f"output.dir={out}", *QUICK, *overrides]
    name, recipe = load_recipe(words)
    run = build_run(recipe, name, words)
    result = train_steps(run)
    if teardown:
        release(run)
    return run, result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_eval_batch(run, n: int = 4) -> dict[str, torch.Tensor]:
    from launcher.data.batches import collate

    batch = collate(run.data.eval.select(range(n)), run.tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def wait_for(predicate, timeout: float, every: float = 0.2) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
