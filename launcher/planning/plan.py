"""`tunefleet plan`: what a run will do and whether it fits, before any weight is loaded.

    tunefleet plan recipe=lora_zero3 distributed.num_processes=8 --device-memory 80GiB [--json]
    tunefleet plan recipe=full cluster=NAME slurm.nodes=2

Reads the recipe and the model's config (launcher.planning.shapes), never the weights, and imports
nothing heavier than pydantic, yaml and gguf, so it answers in about a second.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from launcher.errors import UserError
from launcher.planning.memory import (
    CPU_OVERHEAD, DTYPE_BYTES, GPU_OVERHEAD, Estimate, Setup, activation_bytes, model_state_bytes,
)
from launcher.planning.params import parameters, trainable
from launcher.planning.shapes import read_shape

GiB = 2**30
PLAN_USAGE = """usage: tunefleet plan RECIPE-WORDS [cluster=NAME] [slurm.KEY=VALUE] [--device-memory SIZE] [--gpu] [--json]

Prints the run's layout, batch and steps, and an estimate of each device's peak memory, without
loading weights. --device-memory (e.g. 80GiB) checks the estimate against a budget and, when it
does not fit, suggests changes that would; --gpu sizes for a GPU on a machine without one."""


def parse_size(text: str) -> float:
    """'80GiB', '80G' (binary, as Slurm reads it), '80GB' (decimal), '16000MiB'; a bare number is GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?)(B?))?\s*", text or "", re.IGNORECASE)
    if not match:
        raise UserError(f"--device-memory {text!r}: give a size such as 80GiB, 24GB or 16000MiB")
    number, unit = float(match[1]), (match[2] or "G").upper()
    decimal = bool(match[4]) and not match[3]
    return number * (1000 if decimal else 1024) ** ("KMGT".index(unit) + 1)


def setup_of(recipe) -> Setup:
    from launcher.distributed.deepspeed_config import read_ds_config

    dist = recipe.distributed
    if dist.backend == "ddp":
        return Setup("ddp", dist.world_size, words=["nothing sharded: every rank holds the whole model states"])
    if dist.backend == "fsdp":
        shards = dist.num_processes if dist.fsdp_sharding == "hybrid_shard" else dist.world_size
        words = [f"FSDP2 {dist.fsdp_sharding}: weights, gradients and optimizer states sharded over {shards} ranks"]
        if dist.fsdp_sharding == "shard_grad_op":
            words.append("weights stay gathered from forward to backward")
        if dist.fsdp_cpu_offload:
            words.append("sharded weights, gradients and optimizer states offloaded to host memory")
        return Setup("fsdp", shards, offload_optimizer=dist.fsdp_cpu_offload, offload_params=dist.fsdp_cpu_offload,
                     shard_grad_op=dist.fsdp_sharding == "shard_grad_op", words=words)
    zero = read_ds_config(dist.config).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    off_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    sharded = {1: "optimizer states", 2: "optimizer states and gradients",
               3: "optimizer states, gradients and weights"}.get(stage, "nothing")
    words = [f"DeepSpeed ZeRO-{stage}: {sharded} sharded over {dist.world_size} ranks"]
    if off_opt:
        words.append("optimizer states offloaded to host memory")
    if off_par:
        words.append("weights offloaded to host memory")
    return Setup(f"zero{stage}" if stage else "ddp", dist.world_size, off_opt, off_par, words=words)


def _precision(recipe, gpu: bool) -> str:
    setting = recipe.train.precision
    return ("bf16" if gpu else "fp32") if setting == "auto" else setting


def _num_labels(recipe) -> int | None:
    if recipe.model.task != "classification":
        return None
    if recipe.data.labels:
        return len(recipe.data.labels)
    labels = set()
    for source in recipe.data.sources:
        path = Path(source.path)
        if path.suffix == ".jsonl" and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    labels.add(str(json.loads(line).get(recipe.data.label_field)))
    return len(labels) or 2


def _count_examples(recipe) -> int | None:
    total = 0
    for source in recipe.data.sources:
        path = Path(source.path)
        if path.suffix != ".jsonl" or not path.exists():
            return None  # a hub data set or a format not worth parsing here
        total += sum(1 for line in path.open() if line.strip())
    if recipe.data.eval is None:
        total -= int(total * recipe.data.eval_fraction)
    return min(total, recipe.data.max_samples or total)


def estimate(recipe, gpu: bool) -> tuple[Estimate, dict]:
    shape = read_shape(recipe.model.name, recipe.model.revision)
    labels = _num_labels(recipe)
    teacher_shape = teaching = None
    if recipe.distill:
        teacher_shape, shape, teaching = _distill_shapes(recipe, shape)
    params_total = sum(p.numel for p in parameters(shape, labels))
    train = trainable(shape, recipe.peft, recipe.model.task, labels)
    precision = _precision(recipe, gpu)
    setup = setup_of(recipe)
    qlora = {"double_quant": recipe.peft.double_quant} if recipe.peft.method == "qlora" else None
    result = model_state_bytes(shape, params_total + train.adapter, train, setup, recipe.model.dtype, precision,
                               recipe.train.optimizer, qlora, labels)
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    compute_bytes = 2 if precision in ("bf16", "fp16") else DTYPE_BYTES[recipe.model.dtype]
    classification = recipe.model.task == "classification"
    # Distillation compares full logits: the chunked loss is off (launcher.train.build).
    kept, transient = activation_bytes(shape, train, tokens, compute_bytes, recipe.train.gradient_checkpointing,
                                       recipe.train.chunked_loss and not teaching, classification)
    result.device["activations"] = kept
    result.device["activation peak"] = transient
    distill_facts = None
    if teaching:
        teacher_params = sum(p.numel for p in parameters(teacher_shape, labels))
        teacher_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, recipe.model.dtype)
        # Frozen and replicated whole on every rank (launcher.train.distill), in the training precision.
        result.device["teacher"] = teacher_params * DTYPE_BYTES[teacher_dtype]
        if not classification:  # its logits, and both models' float32 log-probabilities in the KL term
            result.device["activation peak"] += tokens * teacher_shape.vocab * (DTYPE_BYTES[teacher_dtype] + 4 + 4)
        distill_facts = {"teacher": recipe.distill.teacher or recipe.model.name, "teacher_layers": teacher_shape.layers,
                         "teacher_parameters": teacher_params, "teacher_dtype": teacher_dtype,
                         "student_layers": shape.layers}
    result.device["overhead"] = GPU_OVERHEAD if gpu else CPU_OVERHEAD
    facts = {"model": {"family": shape.family, "type": shape.model_type, "layers": shape.layers,
                       "hidden": shape.hidden, "vocab": shape.vocab, "parameters": params_total},
             "weights": _weight_words(recipe, shape, labels, params_total, train),
             "trainable_parameters": train.total, "adapter_parameters": train.adapter, "precision": precision,
             "sharding": setup.words, "tokens_per_micro_batch": tokens}
    if distill_facts:
        facts["distillation"] = distill_facts
    return result, facts


def _distill_shapes(recipe, model_shape):
    """(teacher's shape, the student's shape, whether a teacher is loaded) of a recipe that distills."""
    from dataclasses import replace

    from launcher.model.student_layers import kept_layers

    distill = recipe.distill
    teacher = read_shape(distill.teacher, recipe.model.revision) if distill.teacher else model_shape
    student = model_shape
    if distill.student_layers is not None:
        student = replace(model_shape, layers=len(kept_layers(distill.student_layers, model_shape.layers)))
    return teacher, student, distill.alpha > 0


def _weight_words(recipe, shape, labels, params_total: int, train) -> str:
    from launcher.planning.params import linears

    frozen = params_total - (train.total - train.adapter)
    parts = []
    if recipe.peft.method == "qlora":
        quantized = sum(lin.inp * lin.out for lin in linears(shape, labels) if lin.layer is not None)
        parts.append(f"{quantized:,} in 4-bit {recipe.peft.quant_type}")
        frozen -= quantized
    if frozen:
        parts.append(f"{frozen:,} frozen in {recipe.model.dtype}")
    if train.total:
        parts.append(f"{train.total:,} trainable in float32")
    return ", ".join(parts)


# Changes tried in order of what they cost (speed first, then quality): each is a set of overrides.
def _candidates(recipe) -> list[tuple[str, list[str]]]:
    found = []
    if not recipe.train.gradient_checkpointing:
        found.append(("gradient checkpointing (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    micro = recipe.train.micro_batch_size
    while micro > 1:
        micro //= 2
        found.append((f"micro batch {micro} (more accumulation, same global batch)",
                      [f"train.micro_batch_size={micro}"]))
    dist = recipe.distributed
    for name in ("zero2", "zero3", "zero3_offload"):
        if recipe.peft.method != "qlora" or name == "zero2":
            found.append((f"DeepSpeed {name}", ["distributed.backend=deepspeed", f"distributed.config={name}"]))
    if dist.backend != "fsdp" and recipe.peft.method != "qlora":
        found.append(("FSDP2 full_shard", ["distributed.backend=fsdp", "distributed.config=null"]))
    if recipe.model.task == "causal_lm" and recipe.peft.method in ("lora", "dora", "full"):
        found.append(("QLoRA (4-bit base)", ["peft.method=qlora"]))
    return found


def advise(words: list[str], budget: float, gpu: bool, load) -> list[dict]:
    """The cheapest changes (alone, then with gradient checkpointing) that bring the estimate under budget."""
    _, recipe = load(words)
    advice = []
    tried = _candidates(recipe)
    combos = tried + [(f"{what} + gradient checkpointing", [*extra, "train.gradient_checkpointing=true"])
                      for what, extra in tried if "gradient_checkpointing" not in " ".join(extra)]
    for what, extra in combos:
        try:
            _, changed = load([*words, *extra])
            total = estimate(changed, gpu)[0].total
        except UserError:
            continue  # an incompatible combination is no advice
        if total <= budget:
            advice.append({"change": what, "overrides": extra, "estimate_gib": round(total / GiB, 2)})
        if len(advice) == 3:
            break
    return advice


def plan_command(argv: list[str]) -> int:
    from launcher.cluster.profiles import load_profile
    from launcher.cluster.submit import split_submit_words
    from launcher.config.load import load_recipe
    from launcher.config.preflight import preflight

    as_json, device_memory, words = False, None, []
    it = iter(argv)
    for word in it:
        if word == "--json":
            as_json = True
        elif word == "--gpu":
            words.append("--gpu")
        elif word == "--device-memory" or word.startswith("--device-memory="):
            device_memory = word.partition("=")[2] or next(it, "")
        elif word in ("-h", "--help"):
            print(PLAN_USAGE)
            return 0
        elif word.startswith("-"):
            raise UserError(f"unknown option {word}; tunefleet plan takes --device-memory SIZE, --gpu, --json, "
                            "cluster=NAME, slurm.* and recipe words")
        elif word.partition("=")[0] in ("executor", "local.parallel", "sweep", "sweep.dir"):
            raise UserError(f"{word} is for tunefleet submit; tunefleet plan sizes one run (recipe words, "
                            "cluster=NAME and slurm.* say its layout)")
        else:
            words.append(word)
    force_gpu = "--gpu" in words
    words = [w for w in words if w != "--gpu"]
    recipe_words, options = split_submit_words(words)
    profile = load_profile(options.cluster, options.slurm) if (options.cluster or options.slurm) else None
    layout = []
    if profile is not None:
        layout = [f"distributed.num_machines={profile.nodes}"]
        if profile.gpu_count:
            layout.append(f"distributed.num_processes={profile.gpu_count}")
        if profile.nodes > 1:
            layout.append("distributed.main_process_ip=127.0.0.1")  # filled in per job; only the shape matters here
    gpu = force_gpu or bool(profile and profile.gpu_count) or shutil.which("nvidia-smi") is not None
    budget_text = device_memory or (profile.device_memory if profile else None)
    budget = parse_size(budget_text) if budget_text else None

    def load(extra_words):
        name, recipe = load_recipe([*extra_words, *layout])
        preflight(recipe, name)  # the checks that read files: DeepSpeed stage x method, data paths
        return name, recipe

    name, recipe = load(recipe_words)
    result, facts = estimate(recipe, gpu)
    t = recipe.train
    examples = _count_examples(recipe)
    steps = t.max_steps or (max(1, int(t.epochs * (examples // t.global_batch_size))) if examples else None)
    report = {
        "recipe": name, "method": recipe.peft.method, "model_name": recipe.model.name, **facts,
        "device": "gpu" if gpu else "cpu",
        "batch": {"world_size": recipe.distributed.world_size, "micro_batch_size": t.micro_batch_size,
                  "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
                  "global_batch_size": t.global_batch_size,
                  "tokens_per_step_at_most": t.global_batch_size * recipe.data.max_seq_len,
                  "training_examples": examples, "steps": steps,
                  "epochs": round(steps * t.global_batch_size / examples, 3) if steps and examples else None},
        "memory_per_device_gib": {k: round(v / GiB, 3) for k, v in result.device.items()},
        "memory_total_gib": round(result.total / GiB, 3),
        "host_memory_per_process_gib": {k: round(v / GiB, 3) for k, v in result.host.items()},
        "compatibility": "ok: every rule of launcher/config/compat.py and the file checks of preflight",
        "commands": _commands(recipe, recipe_words, layout, gpu),
        "resolved_recipe": recipe.model_dump(mode="json"),
    }
    if budget is not None:
        report["device_memory_gib"] = round(budget / GiB, 2)
        report["fits"] = result.total <= budget
        if not report["fits"]:
            report["advice"] = advise(recipe_words, budget, gpu, load)
    if profile is not None:
        from launcher.cluster.submit import plan as submission_plan

        sub = submission_plan([*words, "--dry-run"])
        report["sbatch"] = {"command": shlex.join(sub.sbatch_argv), "script": sub.script}
    print(json.dumps(report, indent=2) if as_json else _text(report))
    return 0


def _commands(recipe, recipe_words: list[str], layout: list[str], gpu: bool) -> dict:
    from launcher.launch import accelerate_command

    words = [*recipe_words, *layout]
    argv, env = accelerate_command(recipe, words, has_gpu=gpu)
    accelerate = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])
    return {"tunefleet": shlex.join(["tunefleet", "run", *words]), "accelerate": accelerate}


def _text(r: dict) -> str:
    b, m = r["batch"], r["memory_per_device_gib"]
    lines = [
        f"recipe {r['recipe']}: {r['method']} on {r['model_name']} ({r['model']['type']}, {r['model']['layers']} layers, "
        f"hidden {r['model']['hidden']}, {r['model']['parameters']:,} parameters; {r['trainable_parameters']:,} train)",
        f"batch: global {b['global_batch_size']} = micro {b['micro_batch_size']} x accumulation "
        f"{b['gradient_accumulation_steps']} x world size {b['world_size']}; at most {b['tokens_per_step_at_most']:,} "
        f"tokens per step; {b['steps'] or '?'} steps ({b['epochs'] or '?'} epochs of {b['training_examples'] or '?'} examples)",
        "weights: " + r["weights"],
        *([f"distillation: teacher {d['teacher']} ({d['teacher_layers']} layers, {d['teacher_parameters']:,} parameters "
           f"in {d['teacher_dtype']}, frozen, whole on every device); student {d['student_layers']} layers"]
          if (d := r.get("distillation")) else []),
        "sharding: " + "; ".join(r["sharding"]),
        f"precision {r['precision']} on {r['device']}; per-device memory estimate {r['memory_total_gib']:.2f} GiB:",
        *(f"  {part:<16} {gib:8.3f} GiB" for part, gib in m.items()),
    ]
    if r["host_memory_per_process_gib"]:
        lines.append("  offloaded to host: " + ", ".join(f"{k} {v:.3f} GiB" for k, v in r["host_memory_per_process_gib"].items()))
    if "fits" in r:
        lines.append(f"fits {r['device_memory_gib']} GiB: {'yes' if r['fits'] else 'NO'}")
        for item in r.get("advice", []):
            lines.append(f"  try {item['change']}: {' '.join(item['overrides'])} -> {item['estimate_gib']} GiB")
        if r.get("fits") is False and not r.get("advice"):
            lines.append("  no single change found that fits; add devices or use a smaller model")
    lines += [f"compatibility: {r['compatibility']}", "(--json adds the whole resolved recipe)", "launch:", f"  {r['commands']['tunefleet']}",
              f"  {r['commands']['accelerate']}"]
    if "sbatch" in r:
        lines += ["sbatch (what tunefleet submit would run):", f"  {r['sbatch']['command']}", r["sbatch"]["script"]]
    return "\n".join(lines)
