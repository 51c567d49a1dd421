"""Which folder a run writes to and which checkpoint it continues, and whether it may continue it.

`train.resume=auto` never continues a finished run: with a `{time}` template it takes the newest
matching folder that has a checkpoint and is not finished (or starts a new one); with a fixed
folder that already finished it does nothing and says so, so a requeued job is harmless.

A checkpoint continues only the run that wrote it. Everything that shapes the remaining training
must match: the recipe except the keys in MAY_CHANGE_ON_RESUME (how the work is spread over
processes and how often things are logged or saved), the backend's own settings (the DeepSpeed
JSON, compared by content) and the tokenized data (compared by content). Any other difference is
refused with the keys that differ.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from launcher.config.compat import split_batch
from launcher.errors import UserError
from launcher.outputs.run_dir import check_free, render_dir
from launcher.outputs.run_files import is_finished
from launcher.train.checkpoint import STATE_FILE, complete_checkpoints, read_record
from launcher.train.state import CheckpointRecord

# Keys that may differ between the run that wrote a checkpoint and the run that resumes it: the
# global batch stays fixed, so its split over micro batches and processes does not change the math.
MAY_CHANGE_ON_RESUME = (
    "description",
    "distributed.num_processes", "distributed.num_machines", "distributed.machine_rank",
    "distributed.main_process_ip", "distributed.main_process_port", "distributed.timeout_minutes",
    "distributed.config",  # compared by content through the backend fingerprint instead of by name
    "distributed.fsdp_sharding", "distributed.fsdp_cpu_offload",  # DCP reshards on load
    "distributed.fsdp_defer_gradient_sync",  # when gradients are reduced, not what they sum to
    "model.attn_implementation",  # the attention kernel, not the math
    "train.micro_batch_size", "train.gradient_checkpointing", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.resume", "train.chunked_loss",
    "data.packing", "data.loader_workers",  # how a step's examples are laid out, not which ones
    "eval.batch_size", "eval.at_start", "eval.sample_prompts", "eval.sample_max_new_tokens",
    "eval.gather_weights_gib",
    "output.dir", "output.merge",
    "output.trackers", "output.project", "output.run_name",  # where metrics are sent, not what they are
    "output.verbosity",
)


@dataclass
class RunChoice:
    run_dir: Path
    checkpoint: Path | None
    finished: bool
    reason: str  # printed: what train.resume chose, and why


def choose_run_dir(recipe, recipe_name: str) -> RunChoice:
    """Main process only: the run folder and the checkpoint to resume from, per train.resume."""
    resume, template = recipe.train.resume, recipe.output.dir
    if resume == "auto" and "{time}" in template:
        return _newest_unfinished(template, recipe_name)
    run_dir = render_dir(template, recipe_name).resolve()
    if resume == "never":
        check_free(run_dir)
        return RunChoice(run_dir, None, False, f"starting fresh in {run_dir} (train.resume=never)")
    if resume == "auto":
        return _continue(run_dir, "")
    checkpoint = checkpoint_at(resume)
    return RunChoice(run_dir, checkpoint, False, f"train.resume={resume}: continuing that checkpoint in {run_dir}")


def _continue(run_dir: Path, why: str) -> RunChoice:
    if is_finished(run_dir):
        return RunChoice(run_dir, None, True, f"train.resume=auto: {run_dir} already finished (its status.json says "
                                              "so); nothing to do. Use a new output.dir to train again")
    found = complete_checkpoints(run_dir)
    if found:
        return RunChoice(run_dir, found[-1], False,
                         f"train.resume=auto: continuing {run_dir} from its newest complete checkpoint {found[-1].name}"
                         + why)
    return RunChoice(run_dir, None, False,
                     f"train.resume=auto: no complete checkpoint in {run_dir}, starting from step 0" + why)


def _newest_unfinished(template: str, recipe_name: str) -> RunChoice:
    """A new {time} would never find the interrupted run: continue the newest unfinished one."""
    pattern = template.format(recipe=recipe_name, time="*")
    folders = sorted(Path(p).resolve() for p in glob.glob(pattern))
    finished = [p for p in folders if is_finished(p)]
    resumable = [p for p in folders if p not in finished and complete_checkpoints(p)]
    skipped = f" ({len(finished)} finished run(s) matching {pattern} left alone)" if finished else ""
    if resumable:
        return _continue(resumable[-1], f", the newest unfinished run matching {pattern}" + skipped)
    run_dir = render_dir(template, recipe_name).resolve()
    return RunChoice(run_dir, None, False, f"train.resume=auto: no unfinished run with a checkpoint matches "
                                           f"{pattern}{skipped}; starting fresh in {run_dir}")


def checkpoint_at(path_text: str) -> Path:
    path = Path(path_text)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume={path_text}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def _leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Recipe keys whose values differ, ignoring those that may change on resume."""
    old, new = _leaves(saved), _leaves(current)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)
            and not any(k == allowed or k.startswith(allowed + ".") for allowed in MAY_CHANGE_ON_RESUME)]


def check_resumable(checkpoint: Path, recipe, world_size: int, backend, data_key: str | None) -> CheckpointRecord:
    """The checkpoint's trainer state, after checking this run may continue it exactly."""
    saved = read_record(checkpoint)
    problems = []
    changed = changed_keys(saved.recipe, recipe.model_dump(mode="json"))
    if changed:
        problems.append(f"{', '.join(changed)} changed since it was written (only how the work is split and how "
                        "often it is logged or saved may change)")
    if saved.backend is not None and saved.backend != backend.resume_fingerprint():
        problems.append(f"the distributed setup changed ({saved.backend.get('backend')} then, {backend.name} now, "
                        "or a different DeepSpeed JSON)")
    global_batch = split_batch(recipe.train.global_batch_size, recipe.train.micro_batch_size, world_size).global_batch
    if saved.global_batch is not None and saved.global_batch != global_batch:  # a batch that follows the world size
        problems.append(f"the global batch changed ({saved.global_batch} examples per step then, {global_batch} now: "
                        f"train.global_batch_size=null at another world size; give train.global_batch_size="
                        f"{saved.global_batch})")
    if data_key and saved.data_key and saved.data_key != data_key:
        problems.append("the training data changed (its content or how it is tokenized)")
    if problems:
        raise UserError(f"cannot resume from {checkpoint}: " + "; ".join(problems) + ". Resume with that run's "
                        "recipe.yaml, or start fresh with train.resume=never and a new output.dir")
    if backend.sharded_state and saved.world_size != world_size:
        raise UserError(f"cannot resume from {checkpoint}: it holds optimizer state sharded over {saved.world_size} "
                        f"ranks and this run has {world_size}; resume with the same world size")
    return saved
