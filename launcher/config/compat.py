"""Cross-field rules checked before anything loads.

Each rule names the keys in conflict and says how to fix it. They run inside schema
validation, so `tunefleet validate` and every run report all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config.schema import Recipe, TrainConfig

# Methods that make sense for each task. Kept as one table so the docs can show it.
METHODS_BY_TASK = {
    "causal_lm": ("lora", "qlora", "dora", "prompt_tuning", "prefix_tuning", "ia3", "partial_freeze", "full"),
    "classification": ("lora", "qlora", "dora", "ia3", "partial_freeze", "full", "head_only"),
}
WHY_NOT = {
    ("causal_lm", "head_only"): "a causal LM has no new task head to train; use partial_freeze with train_patterns: [lm_head]",
    ("classification", "prompt_tuning"): "soft prompts for classification are not supported; use lora or head_only",
    ("classification", "prefix_tuning"): "prefix tuning for classification is not supported; use lora or head_only",
}
METRICS_BY_TASK = {
    "causal_lm": ("eval_loss", "perplexity"),
    "classification": ("eval_loss", "accuracy", "precision", "recall", "f1"),
}
# Method x distributed setup: the pairs that cannot work, why, and the nearest setup that does.
# Every other pair is supported and exercised by tests/test_backends.py. Backends are named
# ddp, fsdp, zero1, zero2, zero3 (the ZeRO stage of the DeepSpeed JSON).
UNSUPPORTED_BACKENDS = {
    ("qlora", "zero3"): "ZeRO-3 partitions every weight and bitsandbytes 4-bit weights cannot be partitioned; "
                        "use distributed.config=zero2 (or zero2_offload), or distributed.backend=ddp",
    ("qlora", "fsdp"): "FSDP2 cannot shard bitsandbytes 4-bit weights; use distributed.backend=deepspeed with "
                       "distributed.config=zero2, or distributed.backend=ddp",
}
BACKEND_NAMES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def backend_problem(method: str, backend_key: str) -> str | None:
    reason = UNSUPPORTED_BACKENDS.get((method, backend_key))
    return f"peft.method={method} does not run under {backend_key}: {reason}" if reason else None


# Methods that prepend virtual tokens to every row: a packed row would hold one soft prompt for
# several examples, so they are never packed (data.packing=auto groups by length instead).
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning")


def resolved_packing(recipe: "Recipe") -> str:
    """data.packing with auto resolved from the recipe alone: pack for a causal LM without virtual
    tokens, else group by length.

    Whether packed examples really stay apart depends on the model and its attention kernel, which
    this floor cannot load: launcher.data.packing_check.packing_layout starts from this answer and
    checks it on a tiny twin of the model (falling back to group_by_length, or refusing an explicit
    pack), and picks the flattened layout flash attention needs. A run trains with that answer;
    this one is all that can be said without the model.
    """
    packing = recipe.data.packing
    if packing != "auto":
        return packing
    if recipe.model.task == "causal_lm" and recipe.peft.method not in VIRTUAL_TOKEN_METHODS:
        return "pack"
    return "group_by_length"


# Methods whose adapter can be folded into the base weights.
MERGEABLE = ("lora", "qlora", "dora", "ia3")


@dataclass(frozen=True)
class BatchSplit:
    """global = micro x accumulation x world size, as a run at this world size trains.

    The global batch is the optimisation setting (the learning rate was tuned for it), so it is kept as
    the world size changes: moving a recipe from 1 process to 8 trains the same steps. The micro batch
    is a memory ceiling, so lowering it is always safe: where `requested_micro` x world size does not
    divide the global batch, the largest micro batch below it that does is used (`note` says so).
    `train.global_batch_size=null` asks for the other convention: the micro batch on every process,
    accumulation 1, a global batch that grows with the world size.
    """

    global_batch: int
    micro: int
    accumulation: int
    world_size: int
    requested_micro: int

    @property
    def note(self) -> str | None:
        if self.micro == self.requested_micro:
            return None
        return (f"micro batch {self.micro} (train.micro_batch_size={self.requested_micro} lowered so that global "
                f"batch {self.global_batch} splits over {self.world_size} process(es))")


def split_batch(global_batch: int | None, micro_batch: int, world_size: int) -> BatchSplit:
    """How the global batch splits at `world_size`; a world size that does not divide it is left for
    `batch_split_problem` to refuse (accumulation 0 here)."""
    if global_batch is None:
        return BatchSplit(micro_batch * world_size, micro_batch, 1, world_size, micro_batch)
    if global_batch % world_size:
        return BatchSplit(global_batch, micro_batch, 0, world_size, micro_batch)
    per_process = global_batch // world_size
    micro = max(m for m in range(1, min(micro_batch, per_process) + 1) if per_process % m == 0)
    return BatchSplit(global_batch, micro, per_process // micro, world_size, micro_batch)


def total_steps(train: TrainConfig, num_examples: int, global_batch: int) -> int:
    """Optimizer steps a run takes: train.max_steps, else train.epochs passes of whole global batches
    (each epoch drops its ragged tail, launcher.data.batches), at least one. `tunefleet plan` and the
    run both ask this, so the plan's step count is the run's."""
    if train.max_steps:
        return train.max_steps
    return max(1, int(train.epochs * (num_examples // global_batch)))


def batch_split_problem(global_batch: int | None, micro_batch: int, world_size: int) -> str | None:
    """Say why the global batch cannot be kept at this world size (every process must take the same
    whole number of examples per step), with the exact fix; or None."""
    if global_batch is None or global_batch % world_size == 0:
        return None
    up = -(-global_batch // world_size) * world_size
    return (
        f"train.global_batch_size={global_batch} does not split over world size {world_size} (each process must "
        f"take the same whole number of examples per step): use train.global_batch_size={up} (any multiple of "
        f"{world_size}), or train.global_batch_size=null to train micro batch {micro_batch} on each process "
        f"({micro_batch * world_size} examples per step)"
    )


def loopback_rendezvous_problem(dist) -> str | None:
    """Several machines and a main_process_ip left at its default: refuse.

    The default 127.0.0.1 is "this machine", so every machine would wait for a rendezvous on itself
    until the timeout. Only the default is refused, not loopback as such: whoever writes
    main_process_ip=127.0.0.1 means it (tests/test_multinode.py runs two "machines" on one host),
    and a worker started by accelerate/torchrun gets the address its launcher used (launcher/run.py).
    """
    if dist.num_machines == 1 or "main_process_ip" in dist.model_fields_set:
        return None
    return (f"distributed.num_machines={dist.num_machines} needs distributed.main_process_ip, the address of "
            f"machine 0 that every machine can reach; the default {dist.main_process_ip} is each machine itself. "
            "Set it on every machine (to run all machines on this one host, say "
            "distributed.main_process_ip=127.0.0.1 explicitly)")


def distill_problems(recipe: "Recipe") -> list[str]:
    """What distillation (the distill section) cannot do with the rest of the recipe."""
    distill = recipe.distill
    if distill is None:
        return []
    problems = []
    if distill.teacher is None and distill.student_layers is None:
        problems.append("distill needs distill.teacher (a model or run folder to learn from) or "
                        "distill.student_layers (a smaller student cut from model.name, which then teaches it); "
                        "with neither the student would be its own teacher")
    if recipe.peft.method in VIRTUAL_TOKEN_METHODS:
        problems.append(f"distill does not work with peft.method={recipe.peft.method}: its virtual tokens shift the "
                        "student's positions against the teacher's; use lora, dora, ia3, partial_freeze or full")
    dist = recipe.distributed
    if dist.backend == "deepspeed" and (dist.config or "").startswith("zero3"):
        problems.append(f"distill does not run under distributed.config={dist.config}: {DISTILL_ZERO3_REASON}")
    return problems


# Also checked on the stage a custom DeepSpeed JSON names, before loading (launcher.train.distill).
DISTILL_ZERO3_REASON = ("ZeRO-3 partitions every model transformers loads, the teacher too, and only a DeepSpeed "
                        "engine gathers partitions for a forward; a second engine for the teacher is not "
                        "implemented. Use distributed.config=zero2 (or zero1), distributed.backend=fsdp or ddp")


def check_recipe(recipe: "Recipe") -> list[str]:
    problems: list[str] = distill_problems(recipe)
    task, method = recipe.model.task, recipe.peft.method

    if method not in METHODS_BY_TASK[task]:
        reason = WHY_NOT.get((task, method), f"supported methods for {task}: {', '.join(METHODS_BY_TASK[task])}")
        problems.append(f"peft.method={method} does not work with model.task={task}: {reason}")

    is_classification_data = all(s.format == "classification" for s in recipe.data.sources)
    if (task == "classification") != is_classification_data:
        wanted = "classification" if task == "classification" else "alpaca, chat or text"
        problems.append(f"model.task={task} needs data.format {wanted} (every source in data.train too)")

    split = batch_split_problem(
        recipe.train.global_batch_size, recipe.train.micro_batch_size, recipe.distributed.world_size
    )
    if split:
        problems.append(split)

    if recipe.eval.metric not in METRICS_BY_TASK[task]:
        problems.append(
            f"eval.metric={recipe.eval.metric} is not reported for model.task={task}; "
            f"choose one of {', '.join(METRICS_BY_TASK[task])}"
        )
    if recipe.eval.early_stopping_patience and not recipe.eval.every_steps:
        problems.append("eval.early_stopping_patience needs eval.every_steps: early stopping judges periodic evaluations")
    if recipe.eval.sample_prompts and task != "causal_lm":
        problems.append("eval.sample_prompts is for model.task=causal_lm; remove it for classification")
    if recipe.data.eval is None and recipe.data.eval_fraction == 0 and (
        recipe.eval.every_steps or recipe.eval.at_start or recipe.eval.early_stopping_patience
    ):
        problems.append("evaluation is asked for but there is no eval data: set data.eval or data.eval_fraction > 0")

    if recipe.data.packing == "pack" and task != "causal_lm":
        problems.append("data.packing=pack is for model.task=causal_lm (a classifier reads one example per row); "
                        "use data.packing=group_by_length or auto")
    elif recipe.data.packing == "pack" and method in VIRTUAL_TOKEN_METHODS:
        problems.append(f"data.packing=pack does not work with peft.method={method}: its virtual tokens are "
                        "prepended once per row, not per example; use data.packing=group_by_length or auto")

    if recipe.data.augment.active and all(s.format == "text" for s in recipe.data.sources):
        # Augmentation changes untrained tokens only (classification text, instruction prompts); in
        # plain text every token is a target, so it would silently change nothing.
        problems.append("data.augment changes classification text and the prompts of instruction data, but "
                        "data.format=text trains on every token, so nothing could be augmented; remove "
                        "data.augment or use format alpaca or chat")

    if recipe.output.merge and method not in MERGEABLE:
        problems.append(
            f"output.merge=true needs an adapter that folds into the weights ({', '.join(MERGEABLE)}); "
            f"peft.method={method} " + ("already saves a full model" if method in ("full", "partial_freeze", "head_only")
                                       else "cannot be merged")
        )

    dist = recipe.distributed
    if dist.backend == "deepspeed" and not dist.config:
        problems.append("distributed.backend=deepspeed needs distributed.config (e.g. zero2, zero3, zero3_offload)")
    if dist.config and dist.backend != "deepspeed":
        problems.append(f"distributed.config={dist.config} is a DeepSpeed JSON but distributed.backend={dist.backend}; "
                        "set distributed.backend=deepspeed or remove distributed.config")
    if dist.backend == "fsdp":
        problem = backend_problem(method, "fsdp")
        if problem:
            problems.append(problem)
    if dist.machine_rank >= dist.num_machines:
        problems.append(
            f"distributed.machine_rank={dist.machine_rank} must be below distributed.num_machines={dist.num_machines}"
        )
    loopback = loopback_rendezvous_problem(dist)
    if loopback:
        problems.append(loopback)
    if recipe.train.optimizer == "adamw_8bit" and dist.backend == "fsdp":
        # bitsandbytes steps plain tensors through its own kernels; FSDP2's parameters are DTensor shards.
        problems.append("train.optimizer=adamw_8bit does not run under distributed.backend=fsdp (bitsandbytes' 8-bit "
                        "AdamW cannot step FSDP2's sharded DTensor parameters); use train.optimizer=adamw (FSDP "
                        "already shards its state over the ranks), or distributed.backend=deepspeed with zero2")
    if recipe.train.precision == "fp16" and method == "qlora":
        problems.append("train.precision=fp16 with qlora is unstable; use bf16 or fp32")
    if recipe.train.precision == "fp16" and dist.backend == "fsdp":
        # FSDP2 would need an fp16 mixed-precision policy plus a sharded gradient scaler; bf16 has the
        # range to train without loss scaling and every GPU FSDP targets supports it.
        problems.append("train.precision=fp16 is not supported with distributed.backend=fsdp (it needs loss scaling "
                        "over sharded gradients); use train.precision=bf16, or fp32")
    return problems
