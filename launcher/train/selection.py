"""Evaluation during training, the best artifact, and early stopping.

best/ must agree with the trainer state after a crash at any instant. A new best is therefore
saved to best.pending/ first and published as best/ only once the trainer state that records it
is durable: right after the next checkpoint, or at once when the run writes no checkpoints (then
no resume can disagree with it). On resume, a pending best that the checkpoint records is
published; any other pending best, and a best/ the checkpoint does not record, came from steps
that will run again, and is removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.distributed.backend import unwrapped
from launcher.outputs.atomic import replace_dir
from launcher.train.evaluate import evaluate, improved

if TYPE_CHECKING:
    from launcher.train.build import Run
    from launcher.train.state import TrainState

BEST, PENDING = "best", "best.pending"
ARTIFACT_MARKER = "tunefleet_artifact.json"  # inside an artifact folder: the step (and metric) it holds


def eval_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def run_evaluation(run: Run) -> dict[str, float]:
    from launcher.distributed.inference_weights import for_inference

    with for_inference(run) as whole:
        metrics = evaluate(
            run.model, run.data.eval, accelerator=run.accelerator, batch_size=run.recipe.eval.batch_size,
            pad_token_id=run.tokenizer.pad_token_id, num_labels=run.num_labels,
            forwards_are_collective=run.backend.params_sharded and not whole,
        )
    return {eval_key(k): v for k, v in metrics.items()}


def save_run_artifact(run: Run, name: str, marker: dict) -> dict:
    """Save the artifact from whole tensors (gathered from every rank where sharded); return them."""
    from launcher.outputs.artifacts import save_artifact, tensors_to_gather

    run.accelerator.wait_for_everyone()
    names = tensors_to_gather(unwrapped(run.accelerator, run.model))
    full_state = run.backend.full_state_dict(run.accelerator, run.model, names)
    extra = {ARTIFACT_MARKER: json.dumps(marker, indent=1)}
    if run.data.label_names:
        extra["labels.json"] = json.dumps(run.data.label_names)
    with run.backend.whole_parameters(run.accelerator, run.model):
        save_artifact(unwrapped(run.accelerator, run.model), run.tokenizer, run.run_dir / name,
                      state_dict=full_state, is_main=run.is_main, extra_files=extra)
        run.accelerator.wait_for_everyone()
    return full_state


def evaluate_and_select(run: Run, state: TrainState, step: int) -> tuple[dict[str, float], bool]:
    """Evaluate at `step`, keep a new best, count evaluations without gain; return (metrics, stop early?)."""
    recipe = run.recipe
    key = eval_key(recipe.eval.metric)
    metrics = run_evaluation(run)
    state.eval_final = metrics
    if improved(recipe.eval.metric, metrics[key], state.best_value):
        state.best_value, state.best_step, state.evals_without_gain = metrics[key], step, 0
        save_run_artifact(run, PENDING, {"step": step, "metric": key, "value": metrics[key]})
        if not recipe.train.checkpoint_every:
            publish_best(run, state)  # no checkpoint can ever disagree with it
    else:
        state.evals_without_gain += 1
    patience = recipe.eval.early_stopping_patience
    return metrics, bool(patience and state.evals_without_gain >= patience)


def _marker_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / ARTIFACT_MARKER).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def publish_best(run: Run, state: TrainState) -> None:
    """Main process: make the pending best the published one, if the state records it."""
    if not run.is_main:
        return
    pending = run.run_dir / PENDING
    if pending.is_dir() and _marker_step(pending) == state.best_step:
        replace_dir(pending, run.run_dir / BEST)


def reconcile_best(run_dir: Path, state: TrainState) -> str | None:
    """Main process, on resume: bring best/ in line with the checkpoint's state; say what changed."""
    pending, best = run_dir / PENDING, run_dir / BEST
    if pending.is_dir():
        if _marker_step(pending) == state.best_step:
            replace_dir(pending, best)
        else:
            shutil.rmtree(pending)
    if best.is_dir() and _marker_step(best) != state.best_step:
        shutil.rmtree(best)
        return (f"removed {best}: it came from a step after the checkpoint, which runs again "
                f"(the checkpoint's best is step {state.best_step})")
    return None
