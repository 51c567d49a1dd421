"""The DeepSpeed JSON a run uses, derived from the recipe (no heavy imports: validation uses it).

The shipped JSONs in ds_configs/ say "auto" for everything the recipe decides: batch sizes,
accumulation, clipping and precision. We fill those from the recipe here, and a JSON that hard-codes
one of them to a different value than the recipe is an error before anything loads (config drift
between launcher and DeepSpeed is a classic source of silent mistakes).
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.config.assets import shipped
from launcher.errors import UserError


def find_ds_config(name: str) -> Path:
    """A path to a JSON, else a shipped JSON by name (launcher.config.assets)."""
    folder = shipped("ds_configs")
    candidates = [Path(name).expanduser(), folder / name, folder / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    shipped_names = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
    raise UserError(f"distributed.config={name}: no such DeepSpeed JSON (shipped: {shipped_names}; or give a path)")


def read_ds_config(name: str) -> dict:
    path = find_ds_config(name)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(config.get("zero_optimization", {}).get("stage"), int):
        raise UserError(f"{path}: zero_optimization.stage must be set (0-3)")
    return config


def zero_stage(config: dict) -> int:
    return config["zero_optimization"]["stage"]


def offloads_optimizer(config: dict) -> bool:
    return config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def recipe_values(recipe, accumulation: int, precision: str | None) -> dict:
    """What the recipe decides, under DeepSpeed's key names (precision None: not known yet, not checked)."""
    t, b = recipe.train, recipe.batch
    values = {
        "train_micro_batch_size_per_gpu": b.micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": b.global_batch,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    if precision is not None:
        values.update({"bf16.enabled": precision == "bf16", "fp16.enabled": precision == "fp16"})
    return values


# Device choices a JSON may leave "auto" (the shipped ones do): they have no recipe key, so a JSON that
# sets them is followed, not refused.
DEVICE_KEYS = (("zero_optimization", "overlap_comm"), ("zero_optimization", "offload_optimizer", "pin_memory"),
               ("zero_optimization", "offload_param", "pin_memory"))


def fill_device_choices(config: dict, settings) -> None:
    """overlap_comm (reduce gradients on a side CUDA stream while backward runs) and pinned offload
    buffers: on for GPUs, off on a CPU, where both need CUDA (launcher.distributed.device_settings)."""
    for path in DEVICE_KEYS:
        node = config
        for key in path[:-1]:
            node = node.get(key)
            if not isinstance(node, dict):
                break
        else:
            if node.get(path[-1]) == "auto":
                on = bool(settings and (settings.overlap_comm if path[-1] == "overlap_comm" else settings.pin_memory))
                node[path[-1]] = on


def resolve(config: dict, recipe, accumulation: int, precision: str | None, source: str = "DeepSpeed config",
            settings=None) -> dict:
    """Fill "auto" from the recipe and the device settings; refuse values that disagree with the recipe."""
    resolved = json.loads(json.dumps(config))
    fill_device_choices(resolved, settings)
    drift = []
    for dotted, value in recipe_values(recipe, accumulation, precision).items():
        node, key = resolved, dotted
        if "." in dotted:
            section, key = dotted.split(".")
            node = resolved.setdefault(section, {})
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value:
            drift.append(f"{dotted}={current!r} (the recipe gives {value!r})")
    if drift:
        raise UserError(f"{source} hard-codes {', '.join(drift)}; set these to \"auto\" so the recipe "
                        "stays the single source of truth")
    problems = [f"{source} has its own \"{block}\" block; remove it: the recipe's train.{key} decides (DeepSpeed "
                "would otherwise train with a different optimizer or schedule than the recipe says)"
                for block, key in (("optimizer", "optimizer"), ("scheduler", "scheduler")) if block in resolved]
    if offloads_optimizer(resolved) and recipe.train.optimizer != "adamw":
        problems.append(f"train.optimizer={recipe.train.optimizer} cannot run with the optimizer offloaded to the CPU "
                        f"({source}): ZeRO-Offload steps with DeepSpeed's CPU Adam; use train.optimizer=adamw, or a "
                        "config without offload_optimizer (zero2, zero3)")
    if problems:
        raise UserError("\n".join(problems))
    return resolved
