"""`tunefleet plan`: what a run will do and whether it fits, before any weight is loaded.

    tunefleet plan recipe=lora_zero3 distributed.num_processes=8 --device h100 [--json]
    tunefleet plan recipe=full cluster=NAME slurm.nodes=2
    tunefleet plan recipe=lora --device cpu --device-memory 16GiB

Reads the recipe and the model's config (launcher.planning.shapes), never the weights, and imports
nothing heavier than pydantic, yaml and gguf, so it answers in about a second. The device a run is
planned for (--device, one of launcher.distributed.device_settings.PROFILES; else the cluster
profile's GPU type, else this machine) decides what its device settings resolve to (precision,
weight dtype, attention kernel, fused AdamW) and the memory the verdict compares with.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from launcher.config.compat import total_steps
from launcher.errors import UserError
from launcher.planning.estimate import device_profile, estimate

GiB = 2**30
PLAN_USAGE = """usage: tunefleet plan RECIPE-WORDS [cluster=NAME] [slurm.KEY=VALUE] [--device NAME] [--device-memory SIZE] [--json]

Prints the run's layout, batch and steps, and an estimate of each device's peak memory (of a
training step and of loading), without loading weights. --device plans for that device (cpu, h100,
a100, l4, ...: precision, weight dtype and attention kernel as the run would resolve them there, and
its memory for the verdict) instead of this machine. --device-memory (e.g. 80GiB) sets the budget
to check against; when the run does not fit, changes that would are suggested. --gpu plans for an
unnamed GPU (bf16, memory unknown)."""


def parse_size(text: str) -> float:
    """'80GiB', '80G' (binary, as Slurm reads it), '80GB' (decimal), '16000MiB'; a bare number is GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?)(B?))?\s*", text or "", re.IGNORECASE)
    if not match:
        raise UserError(f"--device-memory {text!r}: give a size such as 80GiB, 24GB or 16000MiB")
    number, unit = float(match[1]), (match[2] or "G").upper()
    decimal = bool(match[4]) and not match[3]
    return number * (1000 if decimal else 1024) ** ("KMGT".index(unit) + 1)


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


# Changes tried in order of what they cost (speed first, then quality): each is a set of overrides.
def _candidates(recipe) -> list[tuple[str, list[str]]]:
    found = []
    if not recipe.train.gradient_checkpointing:
        found.append(("gradient checkpointing (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    micro = recipe.batch.micro
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


def advise(words: list[str], budget: float, device, load) -> list[dict]:
    """The cheapest changes (alone, then with gradient checkpointing) that bring the estimate under budget."""
    _, recipe = load(words)
    advice = []
    tried = _candidates(recipe)
    combos = tried + [(f"{what} + gradient checkpointing", [*extra, "train.gradient_checkpointing=true"])
                      for what, extra in tried if "gradient_checkpointing" not in " ".join(extra)]
    for what, extra in combos:
        try:
            _, changed = load([*words, *extra])
            total = estimate(changed, device)[0].total
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
    from launcher.preflight import preflight

    as_json, device_memory, device_name, words = False, None, None, []
    it = iter(argv)
    for word in it:
        if word == "--json":
            as_json = True
        elif word == "--gpu":
            words.append("--gpu")
        elif word == "--device-memory" or word.startswith("--device-memory="):
            device_memory = word.partition("=")[2] or next(it, "")
        elif word == "--device" or word.startswith("--device="):
            device_name = word.partition("=")[2] or next(it, "")
        elif word in ("-h", "--help"):
            print(PLAN_USAGE)
            return 0
        elif word.startswith("-"):
            raise UserError(f"unknown option {word}; tunefleet plan takes --device NAME, --device-memory SIZE, --gpu, "
                            "--json, "
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
    gpu_type = None
    if profile is not None:
        from launcher.cluster.profiles import GPU_REQUEST

        gpu_type = GPU_REQUEST.match(profile.gpus_per_node).group(1)
    device = device_profile(device_name, force_gpu or bool(profile and profile.gpu_count) or
                            shutil.which("nvidia-smi") is not None, gpu_type)
    gpu = device.gpu
    budget_text = device_memory or (profile.device_memory if profile else None)
    budget = parse_size(budget_text) if budget_text else (device.memory_gib * GiB if device.memory_gib else None)

    def load(extra_words):
        name, recipe = load_recipe([*extra_words, *layout])
        preflight(recipe, name)  # the checks that read files: DeepSpeed stage x method, data paths
        return name, recipe

    name, recipe = load(recipe_words)
    result, facts = estimate(recipe, device)
    t, b = recipe.train, recipe.batch
    examples = _count_examples(recipe)
    steps = total_steps(t, examples, b.global_batch) if t.max_steps or examples else None  # None: examples unknown
    report = {
        "recipe": name, "method": recipe.peft.method, "model_name": recipe.model.name, **facts,
        "device": device.name,
        "batch": {"world_size": recipe.distributed.world_size, "micro_batch_size": b.micro,
                  "gradient_accumulation_steps": b.accumulation,
                  "global_batch_size": b.global_batch, "note": b.note,
                  "tokens_per_step_at_most": b.global_batch * recipe.data.max_seq_len,
                  "training_examples": examples, "steps": steps,
                  "epochs": round(steps * b.global_batch / examples, 3) if steps and examples else None},
        "memory_per_device_gib": {k: round(v / GiB, 3) for k, v in result.device.items()},
        "loading_memory_per_device_gib": {k: round(v / GiB, 3) for k, v in result.loading.items()},
        "training_peak_gib": round(result.training / GiB, 3),
        "loading_peak_gib": round(result.loading_total / GiB, 3),
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
            report["advice"] = advise(recipe_words, budget, device, load)
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


def _settings_line(r: dict) -> str:
    d = r["device_settings"]
    extra = [f"qlora compute {d['qlora_compute_dtype']}"] if d.get("qlora_compute_dtype") else []
    extra += ["tf32 matmuls"] if d["tf32"] else []
    extra += ["fused AdamW"] if d["fused_adamw"] else []
    copies = r.get("autocast_weight_copies_gib") or 0
    extra += [f"autocast keeps 16-bit copies of float32 weights ({copies:.3f} GiB per micro batch)"] if copies else []
    return (f"device {r['device']}: precision {d['precision']}, weights load in {d['weight_dtype']}, attention "
            f"{d['attn_implementation']}" + "".join(f", {e}" for e in extra))


def _text(r: dict) -> str:
    b, m = r["batch"], r["memory_per_device_gib"]
    lines = [
        f"recipe {r['recipe']}: {r['method']} on {r['model_name']} ({r['model']['type']}, {r['model']['layers']} layers, "
        f"hidden {r['model']['hidden']}, {r['model']['parameters']:,} parameters; {r['trainable_parameters']:,} train)",
        f"batch: global {b['global_batch_size']} = micro {b['micro_batch_size']} x accumulation "
        f"{b['gradient_accumulation_steps']} x world size {b['world_size']}; at most {b['tokens_per_step_at_most']:,} "
        f"tokens per step; {b['steps'] or '?'} steps ({b['epochs'] or '?'} epochs of {b['training_examples'] or '?'} examples)"
        + (f"; {b['note']}" if b["note"] else ""),
        "weights: " + r["weights"],
        *([f"distillation: teacher {d['teacher']} ({d['teacher_layers']} layers, {d['teacher_parameters']:,} parameters "
           f"in {d['teacher_dtype']}, frozen, whole on every device); student {d['student_layers']} layers"]
          if (d := r.get("distillation")) else []),
        "sharding: " + "; ".join(r["sharding"]),
        _settings_line(r),
        f"per-device memory estimate {r['memory_total_gib']:.2f} GiB, the larger of training "
        f"({r['training_peak_gib']:.2f} GiB) and loading ({r['loading_peak_gib']:.2f} GiB)",
        f"  training, at its peak ({r['peak_phase']}):",
        *(f"    {part:<34} {gib:8.3f} GiB" for part, gib in m.items()),
        "  loading, at its peak (the rank that loads):",
        *(f"    {part:<34} {gib:8.3f} GiB" for part, gib in r["loading_memory_per_device_gib"].items()),
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
