"""Failure handling across ranks: a dead rank stops everything fast, naming the rank; sharded
checkpoints resume exactly, at the same world size (ZeRO) or any (FSDP2, resharded)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import run as run_script
from tests.helpers import QUICK, read_jsonl
from tests.helpers import BACKENDS, SAME, assert_same_adapter, crash_after, launch, losses
from launcher.distributed.rendezvous import free_port
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def worker_pids(run_dir: Path) -> dict[int, int]:
    """RANK -> pid of the training processes writing to run_dir (not their batch-building children,
    which are forks with the same command line and environment)."""
    found, parents = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not any(arg.endswith(b"launcher/run.py") for arg in cmdline):
                continue
            if f"output.dir={run_dir}".encode() not in cmdline:
                continue
            env = dict(line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line)
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            found[int(pid)] = int(env[b"RANK"])
        except (OSError, KeyError, ValueError):
            continue
    return {rank: pid for pid, rank in found.items() if parents[pid] not in found}


def test_a_dead_rank_stops_the_run_within_a_minute(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
            f"output.dir={run_dir}", "train.max_steps=100000", "eval.every_steps=null", "eval.at_start=false",
            "eval.sample_prompts=[]", "distributed.num_processes=2", f"distributed.main_process_port={free_port()}"]
    child = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120)
    pids = worker_pids(run_dir)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    output, _ = child.communicate(timeout=120)
    assert time.time() - killed_at < 60
    assert child.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun's root-cause report names rank and cause
    assert "a worker process failed" in output


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_resume_is_exact_and_needs_the_same_world_size(stage, tiny_llama, tmp_path):
    words = [*SAME, "train.micro_batch_size=1", "train.max_steps=4", "train.checkpoint_every=2",
             "train.keep_checkpoints=5", *BACKENDS[stage]]
    launch(tmp_path / "resumed", "lora", tiny_llama, *words)
    shutil.copytree(tmp_path / "resumed", tmp_path / "straight")  # what the uninterrupted run left
    crash_after(tmp_path / "resumed", 2)
    shutil.rmtree(tmp_path / "resumed" / "final")  # the adapter compared below is the resumed run's own
    launch(tmp_path / "resumed", "lora", tiny_llama, *words, "train.resume=auto")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")

    crash_after(tmp_path / "resumed", 2)
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
                          f"output.dir={tmp_path / 'resumed'}", *QUICK, *words, "train.micro_batch_size=2",
                          "train.resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "resume with the same world size" in out.stderr, out.stderr[-2000:]


def test_fsdp_resume_reshards_to_another_world_size(tiny_llama, tmp_path):
    words = [*SAME, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", *BACKENDS["fsdp"]]
    launch(tmp_path / "run", "lora", tiny_llama, *words, "train.micro_batch_size=1")
    straight = losses(tmp_path / "run")
    crash_after(tmp_path / "run", 2)
    # Continue in ONE process (micro batch 2 x accumulation 2): the checkpoint was written by two.
    code = run_script.main(["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", *QUICK,
                            *words, "train.micro_batch_size=2", "train.resume=auto"])
    assert code == 0
    assert losses(tmp_path / "run") == pytest.approx(straight, rel=1e-5)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
