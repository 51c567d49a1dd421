"""What a run reports besides metrics: sample generations and each rank's record.

The rank record (ranks/rankN.json) is how a reader, and the tests, see that data parallelism
really happened: the world size each rank saw, which examples it trained on, how many parameter
elements it held (half the model under ZeRO-3/FSDP2 at world size 2), and a checksum of its
trainable weights, which must agree across ranks wherever weights are replicated; and which of
the stack's libraries the rank loaded, at which version (on a cluster, the environment a job really
ran in; a DDP run that loaded DeepSpeed or a LoRA run that loaded bitsandbytes paid for nothing).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import TYPE_CHECKING

import torch

from launcher.distributed.backend import unwrapped
from launcher.data.formats import render_prompt

if TYPE_CHECKING:
    from launcher.train.build import Run


@torch.no_grad()
def generate_samples(run: Run) -> list[dict]:
    """Greedy answers to eval.sample_prompts. With sharded parameters every rank must take part in
    each forward pass; otherwise only the main process generates."""
    from launcher.distributed.inference_weights import for_inference

    recipe = run.recipe
    if not recipe.eval.sample_prompts or not (run.is_main or run.backend.params_sharded):
        return []
    with for_inference(run) as whole:
        # With whole weights on every rank a forward is no collective: the main process answers alone.
        if whole and not run.is_main:
            return []
        return _answers(run, synced=not whole and run.accelerator.num_processes > 1)


def _answers(run: Run, synced: bool) -> list[dict]:
    recipe = run.recipe
    model = unwrapped(run.accelerator, run.model)
    was_training = model.training
    model.eval()
    samples = []
    for prompt in recipe.eval.sample_prompts:
        text = render_prompt(run.tokenizer, recipe.data.prompt_template, prompt)
        encoded = run.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(run.accelerator.device)
        output = model.generate(**encoded, max_new_tokens=recipe.eval.sample_max_new_tokens, do_sample=False,
                                use_cache=True, pad_token_id=run.tokenizer.pad_token_id, synced_gpus=synced)
        answer = run.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "answer": answer.strip()})
    model.train(was_training)
    return samples


def write_rank_summary(run: Run, steps: int, full_state: dict) -> None:
    """Each rank records what it saw and where its weights ended; replicated weights must agree."""
    from accelerate.utils import gather_object

    seen = hashlib.sha256()
    for step in range(steps):
        seen.update(json.dumps(run.plan.micro_batches(step)).encode())
    trainable = {name for name, p in unwrapped(run.accelerator, run.model).named_parameters() if p.requires_grad}
    if run.backend.params_sharded:
        # Each rank holds a shard: the checksum is of the gathered tensors, on the main process.
        checksum = _state_checksum(full_state, trainable) if run.is_main else None
    else:
        checksum = _parameter_checksum(run.model)
    record = {
        "rank": run.accelerator.process_index, "world_size": run.accelerator.num_processes, "steps": steps,
        "data_digest": seen.hexdigest(), "first_micro_batches": run.plan.micro_batches(0), "param_checksum": checksum,
        "backend": run.backend.name, "local_param_elements": _local_elements(run.model),
        "total_param_elements": run.total_params,
        # What the artifact gathered to this process (sharded backends: the main process only).
        "gathered_elements": sum(t.numel() for t in (full_state or {}).values()),
        # The CPU threads this rank trained with (sized from what the scheduler gave it: launcher.distributed.cpus).
        "torch_threads": torch.get_num_threads(),
        "libraries": loaded_libraries(),
    }
    folder = run.run_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{record['rank']}.json").write_text(json.dumps(record, indent=1))
    if run.backend.params_sharded:
        return
    checksums = gather_object([checksum]) if run.accelerator.num_processes > 1 else [checksum]
    if len(set(checksums)) != 1:
        raise RuntimeError(f"ranks ended with different weights (checksums {checksums}): data-parallel sync is broken")


# The libraries under a run, as their distributions are named.
STACK = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes")


def loaded_libraries() -> dict[str, str]:
    """The stack's libraries this process has imported, with their versions."""
    from importlib.metadata import PackageNotFoundError, version

    loaded = {}
    for name in STACK:
        if sys.modules.get(name) is not None:  # None: marked absent (launcher.optional_libraries)
            try:
                loaded[name] = version(name)
            except PackageNotFoundError:  # imported from a source tree
                loaded[name] = getattr(sys.modules[name], "__version__", "unknown")
    return loaded


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process, or its peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _local_elements(model) -> int:
    """Parameter elements this rank actually holds: its shard under ZeRO-3 or FSDP, everything under DDP."""
    total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3 partition
            total += param.ds_tensor.numel()
        elif hasattr(param, "to_local"):  # FSDP2 DTensor shard
            total += param.to_local().numel()
        else:
            total += param.numel()
    return total


def _state_checksum(state: dict, names: set[str]) -> float:
    return float(sum(t.double().sum() for k, t in state.items() if k in names))


def _parameter_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
