"""Two "machines" on loopback, one process each, through accelerate's multi-machine launch: the
run equals the single-machine world-size-2 run, for DDP, FSDP2 (incl. hybrid sharding) and ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import QUICK, run_in_process
from tests.helpers import BACKENDS, SAME, assert_same_adapter, losses
from launcher.distributed.rendezvous import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_in_process("lora", tiny_llama, out, *SAME, "train.micro_batch_size=2")
    return out


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "fsdp_hybrid", "zero3"])
def test_two_machines_match_one(backend, reference, tiny_llama, tmp_path):
    words = BACKENDS.get(backend, ["distributed.backend=fsdp", "distributed.fsdp_sharding=hybrid_shard"])
    port = free_port()
    run_dir = tmp_path / "run"
    machines = []
    for machine_rank in (0, 1):
        argv = [sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
                f"output.dir={run_dir}", *QUICK, *SAME, "train.micro_batch_size=2", *words,
                "distributed.num_processes=1", "distributed.num_machines=2", f"distributed.machine_rank={machine_rank}",
                "distributed.main_process_ip=127.0.0.1", f"distributed.main_process_port={port}"]
        machines.append(subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "--num_machines 2 --machine_rank 1" in outputs[1]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_adapter(reference, run_dir)
    written = json.loads((run_dir / "distributed.json").read_text())
    assert written["world_size"] == 2 and written["num_machines"] == 2
