"""Checkpoints: complete or ignored, never half-used; resume that says what it did.

Layout: RUN/checkpoints/step-00000040/ holds accelerate's state (weights, optimizer, schedule,
every rank's RNG) plus trainer_state.json (step, best metric, early-stopping count, world size).
A checkpoint is written into step-N.tmp by all ranks, and the main process writes
trainer_state.json last and renames the folder: a crash at any point leaves either a complete
checkpoint or a .tmp folder that resume ignores. The last `train.keep_checkpoints` are kept.

For adapter and partially frozen models only trainable tensors are written (the frozen base is
the model the run starts from anyway), which keeps a LoRA checkpoint at megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.errors import UserError

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
# Keys whose change makes an old checkpoint a different run; everything else may change on resume.
FIXED_ON_RESUME = ("model", "peft", "data", "train.global_batch_size", "train.seed", "train.lr", "train.optimizer",
                   "train.scheduler", "train.weight_decay", "train.layer_lr_decay")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .tmp folder or one without its state file is ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.suffix != ".tmp"
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def install_trainable_only_hooks(accelerator, model_is_partial: bool) -> None:
    """Save and load only trainable tensors for models whose frozen part comes from the base model."""
    if not model_is_partial:
        return

    def trainable_keys(model) -> set[str]:
        unwrapped = accelerator.unwrap_model(model)
        return {name for name, p in unwrapped.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            keep = trainable_keys(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[i])
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = load_file(str(Path(input_dir) / name))
            expected = trainable_keys(models[i])
            if set(state) != expected:
                missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
                raise UserError(f"checkpoint {input_dir} does not match this model's trainable parameters "
                                f"(missing {missing}, unexpected {extra}): was it written by another recipe?")
            model.load_state_dict(state, strict=False)
            models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(run, step: int, trainer_state: dict, keep: int) -> Path:
    accelerator, run_dir = run.accelerator, run.run_dir
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    run.backend.save_state(accelerator, str(tmp), run.model, run.optimizer, run.scheduler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_tmp = tmp / (STATE_FILE + ".tmp")
        state_tmp.write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        state_tmp.rename(tmp / STATE_FILE)  # the state file last: its presence marks completeness
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resumable(checkpoint: Path, recipe, world_size: int, sharded_state: bool) -> dict:
    """The checkpoint's trainer state, after checking this run may continue it."""
    state = read_state(checkpoint)
    saved_recipe = state.get("recipe", {})
    current = recipe.model_dump(mode="json")
    changed = []
    for key in FIXED_ON_RESUME:
        section, _, field = key.partition(".")
        old = saved_recipe.get(section, {})
        new = current.get(section, {})
        if field:
            old, new = old.get(field), new.get(field)
        if old != new:
            changed.append(key)
    if changed:
        raise UserError(f"cannot resume from {checkpoint}: {', '.join(changed)} changed since it was written; "
                        "resume with the recipe of that run (its recipe.yaml) or start fresh with train.resume=never")
    if sharded_state and state["world_size"] != world_size:
        raise UserError(f"cannot resume from {checkpoint}: it holds optimizer state sharded over {state['world_size']} "
                        f"ranks and this run has {world_size}; resume with the same world size")
    return state


def find_resume_point(resume: str, run_dir: Path) -> Path | None:
    """Which checkpoint `train.resume` names: newest complete one (auto), a given folder, or none (never)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume={resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return path
