"""The training loop: accumulate, step, log, evaluate, stop early, save.

Loss normalisation: each optimizer step minimises the mean loss over every target (token, or
example for classification) of the global batch. The target count is summed over all micro
batches and ranks first; each micro batch then contributes sum(loss) * world_size / count,
because DDP averages gradients over ranks. So the update is the same whether the global batch
is split as 4x1x1, 2x2x1 or 1x2x2 (micro batch x accumulation x world size), which a plain
mean-per-micro-batch would break whenever micro batches hold different numbers of tokens.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.data.batches import collate, count_targets
from launcher.outputs.artifacts import merge_run, save_artifact
from launcher.outputs.metrics_log import MetricsLog
from launcher.outputs.run_dir import write_json
from launcher.train.build import Run, announce
from launcher.train.checkpoint import check_resumable, save_checkpoint
from launcher.train.evaluate import evaluate, improved
from launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted, StopFlag
from launcher.train.report import generate_samples, peak_memory_mb, write_rank_summary


def micro_batch_loss(model, batch: dict, normalizer: torch.Tensor, classification: bool) -> torch.Tensor:
    if classification:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum") / normalizer
    # transformers sums the token losses and divides by num_items_in_batch (peft prepends ignored
    # labels for virtual tokens, so prompt and prefix tuning count the same targets).
    return model(**batch, num_items_in_batch=normalizer).loss


def eval_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def _evaluate(run: Run) -> dict[str, float]:
    metrics = evaluate(
        run.model, run.data.eval, accelerator=run.accelerator, batch_size=run.recipe.eval.batch_size,
        pad_token_id=run.tokenizer.pad_token_id, num_labels=run.num_labels,
    )
    return {eval_key(k): v for k, v in metrics.items()}


def _save(run: Run, name: str) -> dict:
    """Save the artifact from whole tensors (gathered from every rank where sharded); return them."""
    run.accelerator.wait_for_everyone()
    full_state = run.backend.full_state_dict(run.accelerator, run.model)
    folder = run.run_dir / name
    with run.backend.whole_parameters(run.accelerator, run.model):
        save_artifact(run.accelerator.unwrap_model(run.model), run.tokenizer, folder, state_dict=full_state,
                      is_main=run.is_main)
        if run.is_main and run.data.label_names:
            (folder / "labels.json").write_text(json.dumps(run.data.label_names))
        run.accelerator.wait_for_everyone()
    return full_state


def _restore(run: Run, log: MetricsLog) -> dict:
    """Load the checkpoint train.resume points at (if any) and say what happened."""
    state: dict = {"step": 0, "best_value": None, "best_step": None, "evals_without_gain": 0,
                   "eval_start": None, "eval_final": None, "tokens_done": 0, "elapsed": 0.0}
    checkpoint = run.resume_from
    if checkpoint is None:
        how = {"never": "starting fresh (train.resume=never)",
               "auto": f"train.resume=auto: no complete checkpoint in {run.run_dir}, starting from step 0"}
        announce(how.get(run.recipe.train.resume, "starting fresh"), run.is_main)
        return state
    saved = check_resumable(checkpoint, run.recipe, run.accelerator.num_processes, run.backend.sharded_state)
    run.backend.load_state(run.accelerator, str(checkpoint), run.model, run.optimizer, run.scheduler)
    state.update({k: saved[k] for k in state if k in saved})
    log.truncate_after(state["step"])
    announce(f"resumed from {checkpoint} at step {state['step']} of {run.total_steps} "
             f"(written with world size {saved['world_size']}, now {run.accelerator.num_processes})", run.is_main)
    return state


def _checkpoint(run: Run, state: dict) -> Path:
    trainer_state = {**state, "world_size": run.accelerator.num_processes,
                     "recipe": run.recipe.model_dump(mode="json")}
    return save_checkpoint(run, state["step"], trainer_state,
                           keep=run.recipe.train.keep_checkpoints)


def train_steps(run: Run) -> dict:
    recipe, acc, plan = run.recipe, run.accelerator, run.plan
    from tqdm.auto import tqdm

    log = MetricsLog(run.run_dir if run.is_main else None)
    state = _restore(run, log)
    log.open(purge_after=state["step"])
    classification = run.num_labels is not None
    metric_key = eval_key(recipe.eval.metric)
    has_eval = run.data.eval is not None and len(run.data.eval) > 0
    stopped_early = False

    if has_eval and recipe.eval.at_start and state["step"] == 0:
        state["eval_start"] = _evaluate(run)
        log.log(0, state["eval_start"])
        announce(f"eval before training: {_fmt(state['eval_start'])}", run.is_main)
    samples_before = generate_samples(run) if recipe.eval.at_start and state["step"] == 0 else []

    stop = StopFlag().install()
    started = time.perf_counter() - state["elapsed"]
    train_loss = float("nan")
    progress = tqdm(total=run.total_steps, initial=state["step"], desc="training", disable=not run.is_main,
                    dynamic_ncols=True)
    run.model.train()
    try:
        for step in range(state["step"] + 1, run.total_steps + 1):
            step_start = time.perf_counter()
            batches = [collate(run.data.train.select(idx), run.tokenizer.pad_token_id)
                       for idx in plan.micro_batches(step - 1)]
            local = torch.tensor([sum(count_targets(b["labels"]) for b in batches),
                                  sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64,
                                 device=acc.device)
            targets, tokens = acc.reduce(local.clone(), reduction="sum").tolist()
            normalizer = torch.tensor(max(targets, 1.0) / acc.num_processes, device=acc.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
            for i, batch in enumerate(batches):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                # Gradients are synchronised once per optimizer step, on the last micro batch.
                with run.backend.micro_step(acc, run.model, last=i == len(batches) - 1):
                    loss = micro_batch_loss(run.model, batch, normalizer, classification)
                    run.backend.backward(acc, loss)
                loss_sum += loss.detach().double() * normalizer
            clipped = run.backend.clip_gradients(acc, run.model, recipe.train.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            grad_norm = run.backend.grad_norm_after_step(acc, clipped)

            train_loss = float(acc.reduce(loss_sum, reduction="sum")) / max(targets, 1.0)
            state["step"] = step
            state["tokens_done"] += tokens
            row: dict[str, float] = {}
            if step % recipe.train.log_every == 0 or step == run.total_steps:
                row.update(loss=train_loss, lr=max(run.scheduler.get_last_lr()),
                           tokens_per_s=tokens / max(time.perf_counter() - step_start, 1e-9),
                           epoch=step / plan.steps_per_epoch)
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}")

            every = recipe.eval.every_steps
            if has_eval and ((every and step % every == 0) or step == run.total_steps):
                metrics = _evaluate(run)
                row.update(metrics)
                state["eval_final"] = metrics
                if improved(recipe.eval.metric, metrics[metric_key], state["best_value"]):
                    state["best_value"], state["best_step"], state["evals_without_gain"] = metrics[metric_key], step, 0
                    _save(run, "best")
                else:
                    state["evals_without_gain"] += 1
                patience = recipe.eval.early_stopping_patience
                if patience and state["evals_without_gain"] >= patience:
                    stopped_early = True
                    announce(f"early stop at step {step}: {metric_key} has not improved for {patience} evaluations "
                             f"(best {state['best_value']:.4f} at step {state['best_step']})", run.is_main)
            if row:
                log.log(step, row)
            state["elapsed"] = time.perf_counter() - started
            ckpt_every = recipe.train.checkpoint_every
            if ckpt_every and (step % ckpt_every == 0 or step == run.total_steps or stopped_early):
                _checkpoint(run, state)
            if stop.any_rank_stopping(acc):
                path = _checkpoint(run, state)
                announce(f"{stop.signal_name or 'stop signal on another rank'}: checkpoint {path} written after "
                         f"step {step}; exiting with code {PREEMPTED_EXIT_CODE} (requeue with train.resume=auto)",
                     run.is_main)
                log.close()
                raise Preempted(path)
            if stopped_early:
                break
    finally:
        progress.close()
        stop.uninstall()
    elapsed = time.perf_counter() - started

    final_state = _save(run, "final")
    summary = {"eval_start": state["eval_start"], "eval_final": state["eval_final"], "stopped_early": stopped_early}
    if summary["eval_final"]:
        announce(f"eval after training: {_fmt(summary['eval_final'])}", run.is_main)
    if summary["eval_start"] and summary["eval_final"]:
        announce(f"eval_loss before -> after: {summary['eval_start']['eval_loss']:.4f} -> "
                 f"{summary['eval_final']['eval_loss']:.4f}", run.is_main)
    samples = generate_samples(run)
    for sample, before in zip(samples, samples_before):
        sample["before_training"] = before["answer"]
    if run.is_main and samples:
        with (run.run_dir / "samples.jsonl").open("w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
                before = f" (before training: {sample['before_training']!r})" if "before_training" in sample else ""
                announce(f"sample: {sample['prompt']!r} -> {sample['answer']!r}{before}", True)
    write_rank_summary(run, state["step"], final_state)
    log.close()
    if recipe.output.merge and run.is_main:
        merged = merge_run(run.run_dir)
        announce(f"merged model written to {merged}", True)

    result = {
        "method": recipe.peft.method, "task": recipe.model.task, "steps": state["step"],
        "train_loss": train_loss, "runtime_s": elapsed, "tokens_per_s": state["tokens_done"] / max(elapsed, 1e-9),
        "trainable_params": run.trainable_params, "total_params": run.total_params,
        "world_size": acc.num_processes, "global_batch_size": recipe.train.global_batch_size,
        "gradient_accumulation_steps": plan.accumulation, "peak_memory_mb": peak_memory_mb(),
        "best": ({"metric": metric_key, "value": state["best_value"], "step": state["best_step"]}
                 if state["best_step"] else None),
        **summary, "samples": samples,
    }
    if run.is_main:
        write_json(run.run_dir / "metrics.json", result)
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def run_training(recipe, recipe_name: str, command: list[str]) -> Path:
    """Build, train and tear down; return the run folder."""
    from launcher.train.build import build_run

    run = build_run(recipe, recipe_name, command)
    is_main = run.is_main  # read before release(): afterwards accelerate would start a new group
    try:
        train_steps(run)
    finally:
        release(run)
    announce(f"done: {run.run_dir}", is_main)
    return Path(run.run_dir)


def release(run: Run) -> None:
    """Tear down the process group and accelerate's process-wide state (so a process can run again)."""
    from accelerate.state import AcceleratorState, GradientState

    # Drop the DDP wrapper (its reducer owns a reference to the process group) and DeepSpeed's engine
    # while the group still exists: destroyed afterwards, gloo's destructor waits forever for peers
    # that already exited, and DeepSpeed's teardown needs the group.
    run.model = run.accelerator.unwrap_model(run.model)
    run.optimizer = None
    run.accelerator.free_memory()
    gc.collect()
    run.accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Destroying the group explicitly avoids rare aborts at interpreter exit.
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
