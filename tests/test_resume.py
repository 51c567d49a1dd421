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
from tests.helpers import read_jsonl, run_in_process

ROOT = Path(__file__).resolve().parents[1]
EXACT = ["peft.dropout=0.1", "train.max_steps=6", "eval.every_steps=3", "train.checkpoint_every=2",
         "train.keep_checkpoints=5"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def assert_same_training(a: Path, b: Path) -> None:
    assert losses(b) == pytest.approx(losses(a), rel=1e-6)
    steps = [r["step"] for r in read_jsonl(b / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "a resumed step must be logged once"
    for key, tensor in adapter(a).items():
        torch.testing.assert_close(adapter(b)[key], tensor, atol=1e-6, rtol=1e-5)


def crash_after(run_dir: Path, step: int) -> None:
    """Leave the folder as a crash after `step`'s checkpoint would: later checkpoints gone, a
    half-written one present, metrics and artifacts of the later steps still on disk."""
    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.removeprefix("step-")) > step:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / f"step-{step + 1:08d}.tmp").mkdir(exist_ok=True)
    (run_dir / "metrics.json").unlink()


def test_checkpoints_are_complete_and_pruned(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "run", *EXACT, "train.keep_checkpoints=2")
    kept = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000004", "step-00000006"]
    state = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
    # An adapter checkpoint holds the trainable tensors only, not the frozen base model.
    saved = load_file(str(kept[-1] / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_auto_resume_reproduces_the_uninterrupted_run(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "straight", *EXACT)
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *EXACT)
    crash_after(tmp_path / "resumed", 2)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *EXACT, "train.resume=auto")
    assert "at step 2 of 6" in capsys.readouterr().out
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
    evals = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [0, 3, 6]


def test_resume_says_what_it_did(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *EXACT)
    crash_after(tmp_path / "run", 4)
    capsys.readouterr()
    run_in_process("lora", tiny_llama, tmp_path / "run", *EXACT, "train.resume=auto")
    assert "resumed from" in capsys.readouterr().out
    run_in_process("lora", tiny_llama, tmp_path / "fresh", *EXACT, "train.resume=auto")
    assert "no complete checkpoint" in capsys.readouterr().out


def test_resume_from_a_path_into_a_new_folder(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "straight", *EXACT)
    run_in_process("lora", tiny_llama, tmp_path / "first", *EXACT)
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000004"
    run_in_process("lora", tiny_llama, tmp_path / "second", *EXACT, f"train.resume={checkpoint}")
    assert losses(tmp_path / "second") == pytest.approx(losses(tmp_path / "straight")[4:], rel=1e-6)


def test_resume_refuses_a_different_recipe(tiny_llama, tmp_path):
    run_in_process("lora", tiny_llama, tmp_path / "run", *EXACT)
    code = run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", *EXACT,
                            "train.resume=auto", "train.lr=0.5"])
    assert code == 2


def test_used_folder_without_resume_is_refused(tiny_llama, tmp_path, capsys):
    run_in_process("lora", tiny_llama, tmp_path / "run", *EXACT)
    assert run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}"]) == 2
    assert "train.resume=auto" in capsys.readouterr().err


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


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
