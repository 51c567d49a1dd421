"""A real world-size-2 run on CPU (gloo): ranks hold different data, end with identical weights, and
train exactly like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config.load import load_recipe
from launcher.distributed.rendezvous import free_port
from launcher.launch import accelerate_command
from tests.helpers import QUICK, read_jsonl, run_in_process

ROOT = Path(__file__).resolve().parents[1]
EXACT = ["peft.dropout=0", "eval.every_steps=2", "eval.at_start=false", "train.max_steps=4",
         "train.micro_batch_size=4", "train.global_batch_size=8"]


def test_launch_command_starts_real_cpu_workers():
    _, recipe = load_recipe(["recipe=lora", "distributed.num_processes=2", "distributed.main_process_port=1234"])
    argv, env = accelerate_command(recipe, ["recipe=lora"], has_gpu=False, cpu_count=2)
    # `--cpu --num_processes 2` would silently start one process: we must use --multi_gpu + ACCELERATE_USE_CPU.
    assert "--cpu" not in argv and "--multi_gpu" in argv
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--main_process_port") + 1] == "1234"
    assert env == {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    assert argv[-1] == "recipe=lora" and argv[-2].endswith("launcher/run.py")


def test_launch_command_counts_processes_over_all_machines():
    _, recipe = load_recipe(["recipe=lora", "distributed.num_processes=2", "distributed.num_machines=2",
                             "distributed.machine_rank=1", "distributed.main_process_ip=10.0.0.1",
                             "train.global_batch_size=16"])
    argv, env = accelerate_command(recipe, [], has_gpu=True)
    assert argv[argv.index("--num_processes") + 1] == "4" and argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--main_process_ip") + 1] == "10.0.0.1" and env == {}


def run_cli(*words, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *words], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_world_size_two_matches_one_process(tiny_llama, tmp_path):
    # 9 eval examples in batches of 4: rank 0 evaluates 4 + 1, rank 1 evaluates 4 and then runs a
    # filler batch, so the uneven shard and its filler are exercised and must not count.
    uneven_eval = ["data.max_eval_samples=9", "eval.batch_size=4"]
    common = [f"model.name={tiny_llama}", *QUICK, *EXACT, *uneven_eval]
    out = run_cli("-m", "launcher.cli", "run", "recipe=lora", f"output.dir={tmp_path / 'ws2'}", *common,
                  "distributed.num_processes=2", f"distributed.main_process_port={free_port()}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    ranks = [json.loads((tmp_path / "ws2" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    first0 = {i for mb in ranks[0]["first_micro_batches"] for i in mb}
    first1 = {i for mb in ranks[1]["first_micro_batches"] for i in mb}
    assert len(first0) == len(first1) == 4 and not first0 & first1
    assert ranks[0]["data_digest"] != ranks[1]["data_digest"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]

    # The same global batch in one process (micro 4 x accumulation 2) trains identically.
    run_in_process("lora", tiny_llama, tmp_path / "ws1", *EXACT, *uneven_eval)
    from safetensors.torch import load_file

    ws1 = read_jsonl(tmp_path / "ws1" / "metrics.jsonl")
    ws2 = read_jsonl(tmp_path / "ws2" / "metrics.jsonl")
    assert [r["loss"] for r in ws2 if "loss" in r] == pytest.approx([r["loss"] for r in ws1 if "loss" in r], rel=1e-5)
    assert [r["eval_loss"] for r in ws2 if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in ws1 if "eval_loss" in r], rel=1e-5)
    a = load_file(str(tmp_path / "ws1" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ws2" / "final" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_plain_accelerate_launch_adopts_the_launched_world_size(tiny_bert, tmp_path):
    """The documented `accelerate launch launcher/run.py recipe=...` form, without distributed.* keys."""
    out = run_cli("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", str(free_port()), "launcher/run.py", "recipe=classify_head",
                  f"model.name={tiny_bert}", f"output.dir={tmp_path / 'run'}", *QUICK, "train.micro_batch_size=8",
                  env_extra={"ACCELERATE_USE_CPU": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert "accumulation 1 x world size 2" in out.stdout
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
