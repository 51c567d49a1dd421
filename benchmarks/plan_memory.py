"""How close `tunefleet plan`'s memory estimate is: against DeepSpeed's estimators and CPU measurements.

    .venv/bin/python benchmarks/plan_memory.py > benchmarks/plan_memory.md

The measurements are those tests/test_plan.py asserts on (it holds the measuring helpers), printed
as tables: model states against DeepSpeed's own estimators, activations against the bytes a real
forward pass of SmolLM2-135M keeps for backward (saved-tensor hooks, CPU, float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.config.schema import FullConfig, LoraConfig  # noqa: E402
from launcher.planning.memory import Setup, activation_bytes, model_state_bytes  # noqa: E402
from launcher.planning.params import parameters, trainable  # noqa: E402
from launcher.planning.shapes import read_shape, shape_from_config  # noqa: E402
from tests.test_plan import SMOLLM, _saved_bytes  # noqa: E402

LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True}


def deepspeed_table() -> list[str]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = ["| model | GPUs | ZeRO | plan (GiB) | DeepSpeed (GiB) | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for label, shape in (("SmolLM2-135M", read_shape(SMOLLM)), ("llama 1B", shape_from_config(LLAMA_1B, "1b"))):
        total = sum(p.numel for p in parameters(shape, None))
        full = trainable(shape, FullConfig(method="full"), "causal_lm", None)
        block = max(sum(p.numel for p in parameters(shape, None) if p.layer == b and "proj" in p.name)
                    for b in range(shape.layers))
        for world in (1, 2, 8):
            for stage in (2, 3):
                est = model_state_bytes(shape, total, full, Setup(f"zero{stage}", world), "bfloat16", "bf16",
                                        "adamw", None, None).device
                ours = sum(est[k] for k in ("weights", "adapter", "gradients", "optimizer"))
                if stage == 2:
                    _, theirs = estimate_zero2_model_states_mem_needs(total, world, 1, cpu_offload=False)
                else:
                    _, theirs, _ = estimate_zero3_model_states_mem_needs(total, block, world, 1, cpu_offload=False,
                                                                         cpu_offload_params=False)
                rows.append(f"| {label} | {world} | {stage} | {ours / 2**30:.3f} | {theirs / 2**30:.3f} | "
                            f"{ours / theirs:.3f} |")
    return rows


def activation_table() -> list[str]:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.model.sources import materialize

    shape = read_shape(SMOLLM)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = AutoModelForCausalLM.from_pretrained(materialize(SMOLLM)).train()
    rows = ["| setup | micro batch x length | plan (MiB) | measured (MiB) | ratio |", "| --- | --- | --- | --- | --- |"]
    for name, cfg, checkpointing in (("full fine-tuning", FullConfig(method="full"), False),
                                     ("LoRA q,k,v,o", LoraConfig(method="lora", target_modules=attention), False),
                                     ("LoRA + gradient checkpointing", LoraConfig(method="lora",
                                                                                  target_modules=attention), True)):
        if name.startswith("LoRA q"):
            model = get_peft_model(model, PeftLora(r=8, target_modules=attention, lora_dropout=0.0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        train = trainable(shape, cfg, "causal_lm", None)
        for batch, length in ((1, 128), (2, 256), (4, 512)):
            measured = _saved_bytes(model, batch, length)
            kept, _ = activation_bytes(shape, train, batch * length, 4, checkpointing, False, False)
            rows.append(f"| {name} | {batch} x {length} | {kept / 2**20:.1f} | {measured / 2**20:.1f} | "
                        f"{kept / measured:.3f} |")
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    print("# `tunefleet plan`: estimate against DeepSpeed's estimators and CPU measurements\n")
    print("Produced by `.venv/bin/python benchmarks/plan_memory.py > benchmarks/plan_memory.md` "
          f"(torch {torch.__version__}, CPU).\n")
    print("## Model states (full fine-tuning, bf16, AdamW) vs DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs`\n")
    print("\n".join(deepspeed_table()))
    print("\n## Activations kept for backward vs a real forward of SmolLM2-135M (float32, SDPA, CPU)\n")
    print("\n".join(activation_table()))
