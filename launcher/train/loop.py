"""The training loop: restore, step, evaluate, checkpoint, stop on a signal, finish.

Each part lives in its own module: one optimizer step in launcher.train.step; evaluation, the
best artifact and early stopping in launcher.train.selection; checkpoint files in
launcher.train.checkpoint (and what may resume them in launcher.train.resume); finishing the run
in launcher.train.finish. This module strings them together and records the run's state in
RUN/status.json (running, interrupted, finished, failed).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from launcher.distributed.backend import unwrapped
from launcher.data.augment import build_augmenter
from launcher.data.loader import StepDataset, step_feed
from launcher.outputs.metrics_log import MetricsLog
from launcher.outputs.progress import progress_bar
from launcher.outputs.status import write_status
from launcher.outputs.trackers import close_trackers_as_failed, start_trackers
from launcher.train import faults, heartbeat
from launcher.train.build import Run, RunAlreadyFinished, announce
from launcher.train.checkpoint import checkpoint_root, save_checkpoint
from launcher.train.finish import finish_run, format_metrics
from launcher.train.preemption import (PREEMPTED_EXIT_CODE, Preempted, StopFlag, StoppedBeforeTraining,
                                       training_started)
from launcher.train.report import generate_samples
from launcher.train.selection import evaluate_and_select, reconcile_best, run_evaluation
from launcher.train.state import CheckpointRecord, TrainState
from launcher.train.step import train_step
from launcher.train.throughput import FlopsModel, model_flops_utilisation


def _restore(run: Run, log: MetricsLog) -> TrainState:
    """Load the checkpoint train.resume chose (if any), after checking it may be continued."""
    checkpoint = run.resume_from
    if checkpoint is None:
        state = TrainState()
        if run.is_main:
            reconcile_best(run.run_dir, state)  # a best/ from an attempt that left no checkpoint
        return state
    saved = run.resumed  # checked by build_run before the model loaded
    run.backend.load_state(run.accelerator, str(checkpoint), run.model, run.optimizer, run.scheduler)
    state = saved.state
    log.truncate_after(state.step)
    if run.is_main:
        note = reconcile_best(run.run_dir, state)
        if note:
            announce(note, True)
    announce(f"resumed from {checkpoint} at step {state.step} of {run.total_steps} "
             f"(written with world size {saved.world_size}, now {run.accelerator.num_processes})", run.is_main)
    return state


def _checkpoint(run: Run, state: TrainState) -> Path:
    """Write a checkpoint of the current step, then publish the best artifact it records."""
    heartbeat.beat("checkpointing")
    from launcher.train.selection import publish_best

    record = CheckpointRecord(state, world_size=run.accelerator.num_processes, global_batch=run.plan.global_batch_size,
                              recipe=run.recipe.model_dump(mode="json"), backend=run.backend.resume_fingerprint(),
                              data_key=run.data.cache_key, total_steps=run.total_steps)
    with state.checkpoint_time.timing():
        path = save_checkpoint(run, record, keep=run.recipe.train.keep_checkpoints)
        faults.slow_checkpoint()
        publish_best(run, state)
    return path


def _checkpoint_and_maybe_stop(run: Run, state: TrainState, stop: StopFlag, log: MetricsLog) -> Path | None:
    """Checkpoint when due; on a stop signal (any rank), make sure one exists and raise Preempted.

    Returns the checkpoint written for this step, if any."""
    step, every = state.step, run.recipe.train.checkpoint_every
    written = None
    if every and (step % every == 0 or step == run.total_steps or state.stopped_early):
        written = _checkpoint(run, state)
    _stop_if_signalled(run, state, stop, log, written)
    return written


def _stop_if_signalled(run: Run, state: TrainState, stop: StopFlag, log: MetricsLog, written: Path | None = None,
                       when: str = "") -> None:
    """On a stop signal (any rank): make sure the current step has a checkpoint, record it, raise Preempted."""
    if not stop.any_rank_stopping(run.accelerator):
        return
    step = state.step
    # A step is checkpointed once; with nothing trained yet there is nothing to save (a full model's
    # checkpoint could outlast the warning): the continuation starts over.
    path = written or (_checkpoint(run, state) if step > 0 else None)
    saved = f"checkpoint {path} written after step {step}" if path else "nothing trained yet, no checkpoint"
    announce(f"{stop.signal_name or 'stop signal on another rank'}{when}: {saved}; exiting with code "
             f"{PREEMPTED_EXIT_CODE} (requeue with train.resume=auto)", run.is_main)
    if run.is_main:
        write_status(run.run_dir, "interrupted", step=step, total_steps=run.total_steps,
                     checkpoint=str(path) if path else None, signal=stop.signal_name)
    log.close()
    raise Preempted(path)


def _log_row(run: Run, step: int, result, seconds: float, waited: float, flops: FlopsModel) -> dict[str, float]:
    if step % run.recipe.train.log_every and step != run.total_steps:
        return {}
    row = {"loss": result.loss, "lr": max(run.scheduler.get_last_lr()),
           "tokens_per_s": result.tokens / max(seconds, 1e-9), "padding": 1 - result.tokens / max(result.slots, 1),
           "data_wait_s": waited, "epoch": step / run.plan.steps_per_epoch}
    if result.grad_norm is not None:
        row["grad_norm"] = result.grad_norm
    mfu = model_flops_utilisation(run.accelerator, flops.step_flops(result.tokens, result.attention_pairs), seconds)
    if mfu is not None:
        row["mfu"] = mfu
    return row


def _feed(run: Run, first_step_index: int):
    dataset = StepDataset(run.data.train, run.plan, run.layout, run.recipe.data.max_seq_len,
                          run.tokenizer.pad_token_id, run.total_steps, causal=run.num_labels is None,
                          augment=build_augmenter(run.recipe, run.tokenizer))  # training data only, never eval
    return step_feed(dataset, first_step_index, run.recipe.data.loader_workers,
                     pin_memory=run.accelerator.device.type == "cuda")


def train_steps(run: Run) -> dict:
    try:
        return _train_steps(run)
    except (Preempted, StoppedBeforeTraining):  # stopped, not failed: train.resume=auto continues it
        raise
    except BaseException as err:
        if run.is_main:
            write_status(run.run_dir, "failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            close_trackers_as_failed(run)
        raise


def _train_steps(run: Run) -> dict:
    recipe = run.recipe
    log = MetricsLog(run.run_dir if run.is_main else None, run.accelerator)
    state = _restore(run, log)
    where = start_trackers(run, resumed_at=state.step)  # None on the other processes
    if where:
        announce(where, True)
    log.open()
    # From here until the run has finished a stop signal is recorded and honoured after the current
    # step (or between the final artifacts, launcher.train.finish), never by dying half-way.
    stop = StopFlag().install()
    training_started()
    feed = progress = None
    try:
        if run.is_main:
            write_status(run.run_dir, "running", step=state.step, total_steps=run.total_steps)
        heartbeat.start(run.is_main)
        has_eval = run.data.eval is not None and len(run.data.eval) > 0
        fresh_start = state.step == 0
        started = time.perf_counter() - state.elapsed  # the opening evaluation counts too
        if has_eval and recipe.eval.at_start and fresh_start:
            heartbeat.beat("evaluating")
            with state.eval_time.timing():
                state.eval_start = run_evaluation(run)
            log.log(0, state.eval_start)
            announce(f"eval before training: {format_metrics(state.eval_start)}", run.is_main)
        if recipe.eval.at_start and fresh_start:
            heartbeat.beat("evaluating")
            with state.samples_time.timing():
                state.samples_before = generate_samples(run)
        # This run's checkpoint of state.step, if any (a step is checkpointed once). One resumed
        # from another run's folder has none of its own yet.
        resumed_here = run.resume_from is not None and Path(run.resume_from).parent == checkpoint_root(run.run_dir)
        last_checkpoint = run.resume_from if resumed_here else None
        # A stop during a long opening evaluation is honoured now, not after the first step.
        _stop_if_signalled(run, state, stop, log, last_checkpoint, when=" before the first step")

        progress = progress_bar(total=run.total_steps, desc="training", enabled=run.is_main, initial=state.step)
        run.model.train()
        flops = FlopsModel.of(run.model)
        feed = _feed(run, state.step)
        # An early-stopped run resumed (a stop signal came while it finished) goes straight to finishing.
        for step in range(state.step + 1, 0 if state.stopped_early else run.total_steps + 1):
            fetch_started = time.perf_counter()
            fed = next(feed)
            waited = time.perf_counter() - fetch_started
            result = train_step(run, step, fed)
            seconds = waited + result.seconds
            state.train_loss = result.loss
            state.step, state.tokens_done = step, state.tokens_done + result.tokens
            state.slots_done += result.slots
            state.flops_done += flops.step_flops(result.tokens, result.attention_pairs)
            state.train_seconds += seconds
            row = _log_row(run, step, result, seconds, waited, flops)
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}")
            every = recipe.eval.every_steps
            if has_eval and ((every and step % every == 0) or step == run.total_steps):
                heartbeat.beat("evaluating")
                with state.eval_time.timing():
                    metrics, state.stopped_early = evaluate_and_select(run, state, step)
                row.update(metrics)
                if state.stopped_early:
                    announce(f"early stop at step {step}: {recipe.eval.metric} has not improved for "
                             f"{recipe.eval.early_stopping_patience} evaluations (best {state.best_value:.4f} "
                             f"at step {state.best_step})", run.is_main)
            if row:
                log.log(step, row)
            state.elapsed = time.perf_counter() - started
            last_checkpoint = _checkpoint_and_maybe_stop(run, state, stop, log)
            heartbeat.beat()  # a step done: the hang watchdog's clock starts again
            faults.after_step(step, run.is_main)
            if state.stopped_early:
                break
        feed.close()  # shuts the loader's worker processes down before the finishing work
        progress.close()
        log.close()
        heartbeat.beat("finishing")
        return finish_run(run, state, elapsed=time.perf_counter() - started,
                          stop_point=lambda: _stop_if_signalled(run, state, stop, log, last_checkpoint,
                                                                when=" while finishing"))
    finally:  # closing twice is harmless
        if feed is not None:
            feed.close()
        if progress is not None:
            progress.close()
        stop.uninstall()


def run_training(recipe, recipe_name: str, command: list[str]) -> Path:
    """Build, train and tear down; return the run folder."""
    from launcher.train.build import build_run

    try:
        run = build_run(recipe, recipe_name, command)
    except RunAlreadyFinished as done:
        reset_process_state()
        return done.run_dir
    except BaseException:
        reset_process_state()  # a refused resume or a bad model must not poison this process's next run
        raise
    is_main = run.is_main  # read before release(): afterwards accelerate would start a new group
    try:
        train_steps(run)
    finally:
        release(run)
    announce(f"done: {run.run_dir}", is_main)
    return Path(run.run_dir)


def release(run: Run) -> None:
    """Tear down the model's wrappers, then the process group and accelerate's process-wide state."""
    # Drop the DDP wrapper (its reducer owns a reference to the process group) and DeepSpeed's engine
    # while the group still exists: destroyed afterwards, gloo's destructor waits forever for peers
    # that already exited, and DeepSpeed's teardown needs the group.
    run.model = unwrapped(run.accelerator, run.model)
    run.optimizer = None
    run.accelerator.free_memory()
    gc.collect()
    run.accelerator.end_training()
    reset_process_state()


def reset_process_state() -> None:
    """Destroy the process group and forget accelerate's state (so this process can run again)."""
    from accelerate.state import AcceleratorState, GradientState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Destroying the group explicitly avoids rare aborts at interpreter exit.
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
