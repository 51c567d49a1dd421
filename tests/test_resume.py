"""Checkpoints are atomic and pruned; resume continues exactly where the run stopped; preemption
writes a checkpoint and exits with the documented code."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import run as run_script
from launcher.train.checkpoint import complete_checkpoints
from launcher.train.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import (
    QUICK, RESUMABLE, artifact_tensors, assert_same_training, crash_after, losses, read_jsonl, run_in_process, wait_for,
)

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_are_complete_and_pruned(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE, "train.keep_checkpoints=2")
    kept = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000004", "step-00000006"]
    state = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
    # An adapter checkpoint holds the trainable tensors only, not the frozen base model.
    saved = load_file(str(kept[-1] / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_auto_resume_reproduces_the_uninterrupted_run(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "straight", *RESUMABLE)
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *RESUMABLE)
    crash_after(tmp_path / "resumed", 2)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *RESUMABLE, "train.resume=auto")
    assert "at step 2 of 6" in capsys.readouterr().out
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
    evals = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [0, 3, 6]


@pytest.mark.parametrize("before, after", [(8, 4), (4, 8)], ids=["accumulation 1->2", "accumulation 2->1"])
def test_resume_with_another_accumulation_at_an_odd_step_is_exact(before, after, tiny_llama, tmp_path):
    """The loop, not a restored micro-step counter, decides which micro batch steps the optimizer."""
    common = [*RESUMABLE, "peft.dropout=0", "train.checkpoint_every=3", "train.global_batch_size=8"]  # masks differ by split
    run_in_process("lora", tiny_llama, tmp_path / "straight", *common, f"train.micro_batch_size={before}")
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *common, f"train.micro_batch_size={before}")
    crash_after(tmp_path / "resumed", 3)
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *common, "train.resume=auto",
                   f"train.micro_batch_size={after}")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    for key, tensor in artifact_tensors(tmp_path / "straight").items():
        torch.testing.assert_close(artifact_tensors(tmp_path / "resumed")[key], tensor, atol=1e-5, rtol=1e-4)


def test_resume_says_what_it_did(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    crash_after(tmp_path / "run", 4)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE, "train.resume=auto")
    assert "resumed from" in capsys.readouterr().out
    run_in_process("lora", tiny_llama, tmp_path / "fresh", *RESUMABLE, "train.resume=auto")
    assert "no complete checkpoint" in capsys.readouterr().out


def test_resume_from_a_path_into_a_new_folder(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "straight", *RESUMABLE)
    run_in_process("lora", tiny_llama, tmp_path / "first", *RESUMABLE)
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000004"
    run_in_process("lora", tiny_llama, tmp_path / "second", *RESUMABLE, f"train.resume={checkpoint}")
    assert losses(tmp_path / "second") == pytest.approx(losses(tmp_path / "straight")[4:], rel=1e-6)


@pytest.mark.parametrize("change, named", [
    ("train.lr=0.5", "train.lr"),
    ("train.max_steps=8", "train.max_steps"),  # the schedule's length: LambdaLR state would not carry it
    ("train.warmup_steps=3", "train.warmup_steps"),
    ("train.scheduler=linear", "train.scheduler"),
    ("train.betas=[0.8,0.9]", "train.betas"),
    ("train.optimizer=adamw_8bit", "train.optimizer"),
    ("train.precision=bf16", "train.precision"),
    ("distributed.backend=fsdp", "distributed setup"),
    ("data.train=[{path: data/wordnet/definitions_train.jsonl, weight: 2}]", "data.train"),
])
def test_resume_refuses_what_would_reshape_the_rest_of_the_run(change, named, tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    crash_after(tmp_path / "run", 4)
    capsys.readouterr()
    code = run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", *QUICK,
                            *RESUMABLE, "train.resume=auto", change])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err and named in err, err
    assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1 and "Traceback" not in err
    assert "Loading weights" not in err, "refused before the model loads"


def test_resume_accepts_a_new_split_and_schedule_of_saves(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    crash_after(tmp_path / "run", 4)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE, "train.resume=auto", "train.micro_batch_size=2",
                   "train.checkpoint_every=1", "train.log_every=2", "eval.batch_size=3")
    assert "from its newest complete checkpoint step-00000004" in capsys.readouterr().out
    # Continued from step 4 with the new schedule of saves, not started again.
    assert [p.name for p in complete_checkpoints(tmp_path / "run")][-2:] == ["step-00000005", "step-00000006"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["gradient_accumulation_steps"] == 4  # micro batch 2 now: 8 = 2 x 4


def test_used_folder_without_resume_is_refused(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    assert run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}"]) == 2
    assert "train.resume=auto" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_for_requeue_then_resume_matches(tiny_llama, tmp_path):
    from launcher.distributed.rendezvous import free_port

    common = ["recipe=lora", f"model.name={tiny_llama}", "peft.dropout=0", "train.max_steps=40",
              "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]", "data.max_samples=400"]
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ws2 = ["distributed.num_processes=2", f"distributed.main_process_port={free_port()}"]
    child = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", *common, *ws2, f"output.dir={run_dir}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120)
    os.killpg(child.pid, signal.SIGTERM)  # what Slurm does: every process of the job gets it
    output, _ = child.communicate(timeout=120)
    assert child.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    [checkpoint] = complete_checkpoints(run_dir)
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= stopped_at < 40 and "train.resume=auto" in output

    # Requeued: resume (here in one process: DDP state is whole on every rank, so the world size may change).
    assert run_script.main([*common, f"output.dir={run_dir}", "train.resume=auto"]) == 0
    run_in_process("lora", tiny_llama, tmp_path / "straight", "peft.dropout=0", "train.max_steps=40",
                   "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]", "data.max_samples=400")
    assert_same_training(tmp_path / "straight", run_dir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_are_recorded_not_fatal(signum):
    from types import SimpleNamespace

    from launcher.train.preemption import StopFlag

    stop = StopFlag().install()
    try:
        os.kill(os.getpid(), signum)  # would end the process without the handler
        assert stop.signal_name == signal.Signals(signum).name
        assert stop.any_rank_stopping(SimpleNamespace(device=torch.device("cpu"), num_processes=1))
    finally:
        stop.uninstall()


def test_auto_resume_never_continues_a_finished_run(tiny_llama, tmp_path, capsys):
    """A fixed folder that finished: nothing to do, nothing rewritten (a requeued job is harmless)."""
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    capsys.readouterr()
    code = run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", *QUICK, *RESUMABLE,
                            "train.resume=auto"])
    out = capsys.readouterr().out
    assert code == 0 and "already finished" in out and "nothing to do" in out
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics


def test_auto_resume_with_a_time_template_skips_finished_runs(tiny_llama, tmp_path, capsys):
    template = str(tmp_path / "runs" / "lora-{time}")
    run_in_process("lora", tiny_llama, template, *RESUMABLE)
    [finished] = list((tmp_path / "runs").iterdir())
    metrics = (finished / "metrics.json").read_bytes()
    time.sleep(1.1)  # {time} has one-second resolution
    capsys.readouterr()
    run_in_process("lora", tiny_llama, template, *RESUMABLE, "train.resume=auto")
    out = capsys.readouterr().out
    assert "1 finished run(s)" in out and "starting fresh" in out
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert (finished / "metrics.json").read_bytes() == metrics
    # An interrupted run among them is the one continued.
    newest = max((tmp_path / "runs").iterdir())
    crash_after(newest, 4)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, template, *RESUMABLE, "train.resume=auto")
    assert f"continuing {newest}" in capsys.readouterr().out
    assert json.loads((newest / "metrics.json").read_text())["train_loss"] == pytest.approx(losses(newest)[-1])


def _marker_step(folder: Path):
    return json.loads((folder / "tunefleet_artifact.json").read_text())["step"]


def test_best_is_published_with_the_checkpoint_that_records_it(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    run_in_process("lora", tiny_llama, run_dir, *RESUMABLE, "eval.every_steps=1", "train.lr=1e-2")
    result = json.loads((run_dir / "metrics.json").read_text())
    assert _marker_step(run_dir / "best") == result["best"]["step"] and not (run_dir / "best.pending").exists()
    # A crash after step 3's evaluation found a new best, before step 4's checkpoint recorded it.
    crash_after(run_dir, 2)
    recorded = json.loads((complete_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())["best_step"]
    shutil.copytree(run_dir / "best", run_dir / "best.pending", dirs_exist_ok=True)
    (run_dir / "best.pending" / "tunefleet_artifact.json").write_text('{"step": 3}')
    (run_dir / "best" / "tunefleet_artifact.json").write_text(json.dumps({"step": 5}))  # from a later attempt
    from launcher.train.selection import reconcile_best
    from launcher.train.state import TrainState

    note = reconcile_best(run_dir, TrainState(best_step=recorded))
    assert note and "runs again" in note
    assert not (run_dir / "best").exists() and not (run_dir / "best.pending").exists()
    run_in_process("lora", tiny_llama, run_dir, *RESUMABLE, "eval.every_steps=1", "train.lr=1e-2", "train.resume=auto")
    assert _marker_step(run_dir / "best") == json.loads((run_dir / "metrics.json").read_text())["best"]["step"]


def test_replace_dir_swaps_without_a_missing_moment(tmp_path):
    import threading

    from launcher.outputs.atomic import replace_dir

    target = tmp_path / "artifact"
    target.mkdir()
    (target / "v").write_text("0")
    seen_missing = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if not (target / "v").exists():
                seen_missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for version in range(1, 200):
        new = tmp_path / "artifact.tmp"
        new.mkdir()
        (new / "v").write_text(str(version))
        replace_dir(new, target)
    done.set()
    watcher.join()
    assert (target / "v").read_text() == "199" and not (tmp_path / "artifact.tmp").exists()
    assert not seen_missing


def test_a_stop_signal_on_a_checkpoint_step_writes_that_checkpoint_once(tiny_llama, tmp_path, monkeypatch):
    """Rewriting the same checkpoint would open a window in which it is missing."""
    from launcher.train import loop
    from launcher.train.preemption import Preempted

    real_step, real_save, saved = loop.train_step, loop.save_checkpoint, []

    def step_then_signal(run, step, fed):
        result = real_step(run, step, fed)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2, which is also a checkpoint step
        return result

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    monkeypatch.setattr(loop, "save_checkpoint", lambda run, record, *a, **k: saved.append(record.state.step) or real_save(run, record, *a, **k))
    with pytest.raises(Preempted):
        run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    from launcher.train.loop import reset_process_state

    reset_process_state()
    assert saved == [2]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 2 and status["signal"] == "SIGTERM"
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-00000002"]


def test_a_stop_signal_before_training_began_exits_75_at_once_and_records_no_failure(tiny_llama, tmp_path,
                                                                                   monkeypatch, capsys):
    """A load outliving the scheduler's grace period would end in a SIGKILL that reads as a failure,
    and a preempted job would not be requeued; stopping at once (nothing trained, nothing to save) is
    what lets it be requeued."""
    from launcher.train import build, loop

    monkeypatch.setenv("TUNEFLEET_STATUS_FILE", str(tmp_path / "cli-status"))
    common = ["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", *QUICK, *RESUMABLE]
    before = signal.getsignal(signal.SIGTERM)
    real_build = build.build_run

    def signalled_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build, "build_run", signalled_while_loading)
    assert run_script.main(common) == PREEMPTED_EXIT_CODE
    assert "SIGTERM before training began: nothing to checkpoint" in capsys.readouterr().err
    assert (tmp_path / "cli-status").read_text().strip() == "preempted"  # what `tunefleet run` turns into exit 75
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(build, "build_run", real_build)

    # Interrupted once at step 2, then signalled again while the continuation restores its checkpoint.
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, step, fed: (
        real_step(run, step, fed), step == 2 and os.kill(os.getpid(), signal.SIGTERM))[0])
    assert run_script.main([*common, "train.resume=auto"]) == PREEMPTED_EXIT_CODE
    monkeypatch.setattr(loop, "train_step", real_step)
    real_restore = loop._restore

    def signalled_while_restoring(run, log):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_restore(run, log)

    monkeypatch.setattr(loop, "_restore", signalled_while_restoring)
    assert run_script.main([*common, "train.resume=auto"]) == PREEMPTED_EXIT_CODE
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 2  # not "failed", not "running"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    monkeypatch.setattr(loop, "_restore", real_restore)
    assert run_script.main([*common, "train.resume=auto"]) == 0
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("early_stop,every", [(False, "null"), (True, "null"), (False, "2")],
                         ids=["last-step", "early-stop", "last-step-checkpointed"])
def test_a_stop_signal_while_finishing_checkpoints_and_the_resumed_run_only_finishes(early_stop, every, tiny_llama,
                                                                                  tmp_path, monkeypatch):
    """Killed half-way through writing its artifacts, a run would be left 'running' with nothing to
    requeue; it stops between them instead, and its continuation trains no further step."""
    from launcher.train import finish, loop
    from launcher.train.preemption import Preempted

    # every=null: the stop itself must write the one checkpoint; every=2: the last step's is reused.
    words = [*RESUMABLE, f"train.checkpoint_every={every}"]
    if early_stop:
        real_select = loop.evaluate_and_select
        monkeypatch.setattr(loop, "evaluate_and_select",
                            lambda run, state, step: (real_select(run, state, step)[0], step == 3))
    run_in_process("lora", tiny_llama, tmp_path / "whole", *words)
    loop.reset_process_state()

    real_save, saved = finish.save_run_artifact, []

    def save_then_signal(run, name, marker):
        state = real_save(run, name, marker)
        saved.append(name)
        if name == "final" and saved.count("final") == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return state

    monkeypatch.setattr(finish, "save_run_artifact", save_then_signal)
    real_checkpoint, written = loop.save_checkpoint, []
    monkeypatch.setattr(loop, "save_checkpoint",
                        lambda run, record, *a, **k: written.append(record.state.step)
                        or real_checkpoint(run, record, *a, **k))
    stopped_at = 3 if early_stop else 6
    with pytest.raises(Preempted):
        run_in_process("lora", tiny_llama, tmp_path / "run", *words)
    loop.reset_process_state()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == stopped_at
    assert written == ([2, 4, 6] if every == "2" else [stopped_at])  # the last step's checkpoint written once
    assert complete_checkpoints(tmp_path / "run")[-1].name == f"step-{stopped_at:08d}"
    assert not (tmp_path / "run" / "metrics.json").exists()

    _, result = run_in_process("lora", tiny_llama, tmp_path / "run", *words, "train.resume=auto")
    loop.reset_process_state()
    assert saved.count("final") == 2  # the continuation redid the finishing, and only that
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert result["steps"] == whole["steps"] == stopped_at and result["stopped_early"] == whole["stopped_early"] == early_stop
    assert result["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)  # carried by the checkpoint
    assert result["eval_final"]["eval_loss"] == pytest.approx(whole["eval_final"]["eval_loss"], rel=1e-6)
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    for key, tensor in artifact_tensors(tmp_path / "whole").items():
        torch.testing.assert_close(artifact_tensors(tmp_path / "run")[key], tensor, atol=1e-6, rtol=1e-5)
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")  # the answers before training came with the checkpoint
    assert samples and samples == read_jsonl(tmp_path / "whole" / "samples.jsonl") and "before_training" in samples[0]


def test_a_stop_signal_during_the_opening_evaluation_stops_before_the_first_step(tiny_llama, tmp_path, monkeypatch):
    """Recorded only, it would wait for the evaluation, a step and a checkpoint: past a launcher's grace period."""
    from launcher.train import loop
    from launcher.train.preemption import Preempted

    real_eval, calls = loop.run_evaluation, []

    def signalled_eval(run):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_eval(run)

    monkeypatch.setattr(loop, "run_evaluation", signalled_eval)
    with pytest.raises(Preempted):
        run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE)
    loop.reset_process_state()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 0
    assert not [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]  # no step was taken
    run_in_process("lora", tiny_llama, tmp_path / "run", *RESUMABLE, "train.resume=auto")
    loop.reset_process_state()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigusr1_to_the_launcher_alone_checkpoints_every_rank(tiny_llama, tmp_path):
    """Slurm's time-limit warning may be USR1, sent to the launcher only: torchrun's agent would die of
    it, so the launcher passes it on as SIGTERM, which the agent forwards to its workers."""
    from launcher.distributed.rendezvous import free_port

    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
                              "train.max_steps=400", "eval.every_steps=null", "eval.at_start=false",
                              "eval.sample_prompts=[]", "data.max_samples=400", "distributed.num_processes=2",
                              f"distributed.main_process_port={free_port()}", f"output.dir={run_dir}"],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120)
    child.send_signal(signal.SIGUSR1)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    [checkpoint] = complete_checkpoints(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
