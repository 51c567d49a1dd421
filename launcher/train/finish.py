"""Finishing a run: the final artifact, sample answers, each rank's record, the merge, metrics.json."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from launcher.outputs.run_dir import write_json
from launcher.outputs.run_files import FINISHED
from launcher.outputs.status import write_status
from launcher.train.build import announce
from launcher.train.report import generate_samples, peak_memory_mb, write_rank_summary
from launcher.train.selection import eval_key, publish_best, save_run_artifact
from launcher.train.throughput import model_flops_utilisation

if TYPE_CHECKING:
    from launcher.train.build import Run
    from launcher.train.state import TrainState


def finish_run(run: Run, state: TrainState, *, elapsed: float, stop_point: Callable[[], None] = lambda: None) -> dict:
    """Write everything a finished run leaves behind; return (and on the main process write) metrics.json.

    `stop_point` is called (on every rank) between the parts: on a stop signal it raises Preempted
    after making sure the last step has a checkpoint, and the resumed run finishes again from there.
    Each part replaces what it writes whole, so redoing it leaves nothing half-written.
    """
    recipe = run.recipe
    publish_best(run, state)
    final_state = save_run_artifact(run, "final", {"step": state.step})
    stop_point()
    summary = {"eval_start": state.eval_start, "eval_final": state.eval_final, "stopped_early": state.stopped_early}
    if summary["eval_final"]:
        announce(f"eval after training: {format_metrics(summary['eval_final'])}", run.is_main)
    if summary["eval_start"] and summary["eval_final"]:
        announce(f"eval_loss before -> after: {summary['eval_start']['eval_loss']:.4f} -> "
                 f"{summary['eval_final']['eval_loss']:.4f}", run.is_main)
    samples = _write_samples(run, state)
    write_rank_summary(run, state.step, final_state)
    stop_point()
    if recipe.output.merge and run.is_main:
        from launcher.outputs.artifacts import merge_run

        announce(f"merged model written to {merge_run(run.run_dir)}", True)
    metric_key = eval_key(recipe.eval.metric)
    result = {
        "method": recipe.peft.method, "task": recipe.model.task, "steps": state.step,
        "train_loss": state.train_loss, "runtime_s": elapsed,
        "tokens_per_s": state.tokens_done / max(state.train_seconds, 1e-9),
        "padding": 1 - state.tokens_done / max(state.slots_done, 1),
        "mfu": model_flops_utilisation(run.accelerator, state.flops_done, state.train_seconds),
        "trainable_params": run.trainable_params, "total_params": run.total_params,
        "world_size": run.accelerator.num_processes, "global_batch_size": run.plan.global_batch_size,
        "gradient_accumulation_steps": run.plan.accumulation, "peak_memory_mb": peak_memory_mb(),
        "dropped_examples": run.data.dropped,
        "best": ({"metric": metric_key, "value": state.best_value, "step": state.best_step}
                 if state.best_step else None),
        **summary, "samples": samples,
        # Where the run's time went, per part (evaluation and samples include gathering sharded weights).
        "seconds": {"training": state.train_seconds, "evaluation": state.eval_time.seconds,
                    "samples": state.samples_time.seconds, "checkpoints": state.checkpoint_time.seconds,
                    "total": elapsed},
    }
    seconds = result["seconds"]
    announce(f"time: training {seconds['training']:.1f}s, evaluation {seconds['evaluation']:.1f}s, sample answers "
             f"{seconds['samples']:.1f}s, checkpoints {seconds['checkpoints']:.1f}s of {elapsed:.1f}s", run.is_main)
    if run.is_main:
        write_json(run.run_dir / "metrics.json", result)
        write_status(run.run_dir, FINISHED, step=state.step, total_steps=run.total_steps)
    return result


def _write_samples(run: Run, state: TrainState) -> list[dict]:
    with state.samples_time.timing():
        samples = generate_samples(run)
    for sample, before in zip(samples, state.samples_before):
        sample["before_training"] = before["answer"]
    if run.is_main and samples:
        with (run.run_dir / "samples.jsonl").open("w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
                before = f" (before training: {sample['before_training']!r})" if "before_training" in sample else ""
                announce(f"sample: {sample['prompt']!r} -> {sample['answer']!r}{before}", True)
    return samples


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
