"""The Slurm job's own decisions, without a cluster: which id a job acts on, what its training step is
given (CPUs, a rendezvous port free on the head node, the GPUs each node must have), how a stop
request reaches rank 0, and when a stopped step is requeued. The same paths run against the real
local Slurm in tests/test_slurm.py and tests/test_slurm_sites.py."""

import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.cluster.job import StopRequests, step_command, step_environment, stopped_for_requeue
from launcher.cluster.job_settings import JobSettings
from launcher.cluster.node import gpu_processes
from launcher.cluster.retry import (InfrastructureFailure, diagnose, exclusion_command, past_retries,
                                    record_retry)
from launcher.cluster.watchdog import last_progress, wait_for_step
from launcher.cluster.slurm_env import (EXPECTED_GPUS_ENV, PORT_ENV, SlurmJob, allocated_cpus_per_node,
                                        gpus_on_node)
from launcher.distributed.cpus import CPU_BUDGET_ENV, cpu_budget, threads_per_process
from launcher.distributed.rendezvous import LOWEST_PORT, ephemeral_range, pick_rendezvous_port
from launcher.errors import UserError
from launcher.outputs.status import write_status
from launcher.train.heartbeat import HEARTBEAT_ENV
from launcher.train.preemption import STOP_FILE_ENV, StopFlag

JOB = SlurmJob(job_id=41, node_id=0, hosts=("node1", "node2"), restart_count=0)


def test_an_array_task_acts_on_itself_and_not_on_the_whole_array():
    # In an array one task's SLURM_JOB_ID equals SLURM_ARRAY_JOB_ID: that bare id is the whole array.
    base_task = SlurmJob(job_id=40, node_id=0, hosts=("node1",), restart_count=0, array_job_id=40, array_task_id=1)
    assert base_task.self_id == "40_1"
    assert SlurmJob(job_id=41, node_id=0, hosts=("node1",), restart_count=0).self_id == "41"


def test_the_step_gets_the_allocations_cpus_per_node():
    assert allocated_cpus_per_node({"SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_CPUS_PER_NODE": "64(x2)"}) == 16
    assert allocated_cpus_per_node({"SLURM_JOB_CPUS_PER_NODE": "72(x2),36"}) == 36
    assert allocated_cpus_per_node({}) is None
    argv = step_command(["recipe=lora"], JOB, JobSettings(), cpus_per_node=36)
    assert argv[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=36"]
    assert argv[5:8] == [sys.executable, "-m", "launcher.cluster.node"]
    assert not any(a.startswith("--cpus-per-task") for a in step_command([], JOB, JobSettings(), None))


def test_threads_follow_the_cpus_a_run_was_given():
    assert cpu_budget({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert cpu_budget({CPU_BUDGET_ENV: "1"}) == 1
    assert cpu_budget({}) >= 1
    assert threads_per_process(2, {"SLURM_CPUS_PER_TASK": "16"}) == max(1, min(16, cpu_budget({})) // 2)
    from launcher.cluster.local_executor import share_of_cpus

    assert share_of_cpus(2, {})[CPU_BUDGET_ENV] == str(max(1, cpu_budget({}) // 2))


def test_the_rendezvous_port_is_free_on_the_head_and_outside_the_ephemeral_range():
    port = pick_rendezvous_port(12345)
    assert LOWEST_PORT <= port < ephemeral_range()[0]
    with socket.socket() as taken:  # another job (or any connection) holds it now: the next candidate
        taken.bind(("", port))
        other = pick_rendezvous_port(12345)
        assert other != port and LOWEST_PORT <= other < ephemeral_range()[0]
    env = step_environment(JOB, JobSettings(env={"NCCL_SOCKET_IFNAME": "ib0"}), Path("/run"),
                           {"SLURMD_NODENAME": "node1", "SLURM_GPUS_ON_NODE": "8"})
    assert env[PORT_ENV].isdigit() and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env[STOP_FILE_ENV] == "/run/slurm/stop-request" and env[HEARTBEAT_ENV] == "/run/slurm/heartbeat"
    assert env[EXPECTED_GPUS_ENV] == "8"
    assert JOB.port({PORT_ENV: env[PORT_ENV]}) == int(env[PORT_ENV])
    # Not on the head node (never the case for a batch script): no port is picked there.
    assert PORT_ENV not in step_environment(JOB, JobSettings(), Path("/x"), {"SLURMD_NODENAME": "node2"})


def test_gpus_given_by_slurm_set_the_processes_per_node_and_mismatches_name_the_node():
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}) == 8
    assert gpus_on_node({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == 4
    assert gpus_on_node({"CUDA_VISIBLE_DEVICES": ""}) == 0 and gpus_on_node({}) is None
    assert gpu_processes(["recipe=lora_zero3"], 8, 8, 8, "gpu7") == 8  # the recipe's 2 (for CPU) gives way
    assert gpu_processes(["distributed.num_processes=8"], 8, None, 8, "gpu7") == 8
    assert gpu_processes([], None, None, 4, "gpu7") == 4  # a site without GPU scheduling: what CUDA sees
    assert gpu_processes([], 0, 0, None, "cpu1") is None and gpu_processes([], None, None, None, "cpu1") is None
    with pytest.raises(UserError, match="node gpu7 was given 8 GPU.* CUDA is not available"):
        gpu_processes([], 8, 8, None, "gpu7")
    with pytest.raises(UserError, match="node gpu9 was given 4 GPU.*the head node 8"):
        gpu_processes([], 4, 8, 4, "gpu9")
    with pytest.raises(UserError, match="num_processes=2, but node gpu7 was given 8"):
        gpu_processes(["distributed.num_processes=2"], 8, 8, 8, "gpu7")
    with pytest.raises(UserError, match="CUDA sees 2"):
        gpu_processes([], 8, 8, 2, "gpu7")


class FakeAccelerator(SimpleNamespace):
    device = "cpu"
    num_processes = 1


@pytest.mark.parametrize("main", [True, False])
def test_a_stop_request_file_is_read_by_rank_0_at_the_step_boundary(tmp_path, monkeypatch, main):
    request = tmp_path / "slurm" / "stop-request"
    monkeypatch.setenv(STOP_FILE_ENV, str(request))
    flag = StopFlag()
    accelerator = FakeAccelerator(is_main_process=main)
    assert not flag.any_rank_stopping(accelerator)
    stops = StopRequests()
    stops.arm(request)  # the batch process, before any signal: nothing written
    assert not request.exists()
    stops._on_signal(10, None)  # SIGUSR1
    assert request.read_text().strip() == "SIGUSR1"
    # Rank 0 sees it; another rank learns it from rank 0 through the all-reduce, never from the file.
    assert flag.any_rank_stopping(accelerator) is main
    if main:
        assert flag.signal_name == "stop request (SIGUSR1)"


def test_an_earlier_attempts_stop_request_is_cleared_when_the_job_starts(tmp_path):
    request = tmp_path / "stop-request"
    request.write_text("SIGUSR1\n")
    StopRequests().arm(request)
    assert not request.exists()


def test_a_stopped_step_is_requeued_when_the_run_stopped_and_not_when_it_finished_or_failed(tmp_path):
    assert not stopped_for_requeue(0, tmp_path, stop_requested=False)  # finished without status: nothing to do
    assert stopped_for_requeue(0, tmp_path, stop_requested=True)  # stopped before training began: no status
    write_status(tmp_path, "interrupted", step=3)
    assert stopped_for_requeue(0, tmp_path, stop_requested=False)
    write_status(tmp_path, "finished")
    assert not stopped_for_requeue(0, tmp_path, stop_requested=True)  # the stop came after the end
    assert not stopped_for_requeue(1, tmp_path, stop_requested=True)  # a failure is never requeued


SRUN_FAILED = "srun: error: node2: task 1: Exited with exit code 1\nsrun: error: node1: task 0: Killed\n"


@pytest.mark.parametrize("output, kind, blamed", [
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
     "NCCL failure", ()),  # seen by the ranks that waited for a broken peer: no node is blamed
    ("[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)", "NCCL failure", ()),
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", "GPU fault", ("node2",)),
    ("torch.distributed.DistNetworkError: failed to connect to node1:15010", "network failure", ()),
    ("srun: error: Node failure on node2", "node failure", ("node2",)),
    ("error (node gpu3): node gpu3 was given 8 GPU(s) but CUDA sees 7", "GPU fault", ("gpu3",)),
])
def test_failures_of_the_machine_are_told_from_the_recipes(output, kind, blamed):
    failure = diagnose(f"[tunefleet] training ...\n{output}\n{SRUN_FAILED}", code=3 if "CUDA sees" in output else 1)
    assert failure is not None and failure.kind == kind and output.split(":")[-1].strip() in failure.evidence
    assert failure.nodes == blamed


ROOT_CAUSE = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
launcher/run.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  host      : gpu7
  rank      : 3 (local_rank: 3)
  exitcode  : 1 (pid: 4242)
  traceback : Traceback (most recent call last):
    {error}
============================================================
"""


@pytest.mark.parametrize("output, code", [
    ("error: data.train=rows.jsonl does not exist", 2),  # a UserError, whatever else the log holds
    ("NCCL error in: ... (a UserError's exit status wins)", 2),
    ("RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)", 1),  # the recipe's model
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1),  # the recipe's sizes
    ("NCCL error in: ...", 0),  # it finished
    # Rank 3 ran out of memory; rank 0, waiting for it, timed out in NCCL: the root cause decides.
    ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7)\n"
     + ROOT_CAUSE.format(error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"), 1),
    # A tracker lost its connection earlier; the run failed on the recipe's data.
    ("wandb: Network error (ConnectionError), entering retry loop: Connection reset by peer\n"
     "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'text'", 1),
    # A data loader worker's bus error (a full /dev/shm) is the recipe's loader_workers, not the node.
    ("ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory "
     "(shm).\nRuntimeError: DataLoader worker (pid 77) is killed by signal: Bus error.", 1),
])
def test_a_users_error_is_never_taken_for_the_machines(output, code):
    assert diagnose(f"{output}\n{SRUN_FAILED}", code) is None


def test_the_root_cause_names_the_failure_when_other_ranks_print_others():
    output = ("RuntimeError: shapes cannot be multiplied (printed by a dying rank's neighbour)\n"
              + ROOT_CAUSE.format(error="RuntimeError: CUDA error: uncorrectable ECC error encountered") + SRUN_FAILED)
    failure = diagnose(output, 1)
    assert failure is not None and failure.kind == "GPU fault"


def test_the_exclusion_job_runs_where_the_job_ran_and_names_no_shell_code(tmp_path):
    argv = exclusion_command("41_3", ("node2",), tmp_path, {"SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_ACCOUNT": "p1"})
    assert argv[:2] == ["sbatch", "--parsable"] and "--partition=gpu" in argv and "--account=p1" in argv
    wrap = next(a for a in argv if a.startswith("--wrap="))
    assert wrap.endswith("-m launcher.cluster.retry exclude 41_3 node2")
    assert f"--output={tmp_path / 'slurm' / 'exclude-%j.out'}" in argv


def test_retries_are_recorded_across_attempts(tmp_path):
    failure = diagnose("NCCL error in: x\n" + SRUN_FAILED, 1)
    record_retry(tmp_path, "41", 0, failure)
    record_retry(tmp_path, "41", 1, InfrastructureFailure("hang", "no new step for 1800 s", ()))
    record_retry(tmp_path, "52", 0, failure)  # the run submitted again later: a new job, a new budget
    assert [(r["kind"], r["restart"], r["nodes"]) for r in past_retries(tmp_path, "41")] == [
        ("NCCL failure", 0, []), ("hang", 1, [])]
    assert len(past_retries(tmp_path)) == 3 and len(past_retries(tmp_path, "52")) == 1
    (tmp_path / "slurm" / "retries.json").write_text("{not json")
    assert past_retries(tmp_path, "41") == []  # unreadable: counts as none, never a traceback


def test_the_watchdog_times_training_steps_only_and_ends_a_step_without_progress(tmp_path, monkeypatch):
    import subprocess
    import threading
    import time

    from launcher.train import heartbeat

    beat_file = tmp_path / "slurm" / "heartbeat"
    beat_file.parent.mkdir()
    monkeypatch.setenv(HEARTBEAT_ENV, str(beat_file))
    heartbeat.start(is_main=True)  # an earlier attempt's beat: not this attempt's progress
    assert beat_file.read_text() == "training\n" and last_progress(tmp_path, time.time() + 1) is None
    killed = []
    # This attempt is evaluating (or loading, checkpointing, finishing) for longer than the limit: never killed.
    threading.Timer(0.1, heartbeat.beat, ["evaluating"]).start()
    slow_eval = subprocess.Popen(["sleep", "1"])
    assert wait_for_step(slow_eval, tmp_path, 0.2, lambda: killed.append(1), poll=0.05) == (0, None) and not killed
    # It trains a step, then nothing moves: killed once the limit has passed since that step.
    hung = subprocess.Popen(["sleep", "30"])
    threading.Timer(0.1, heartbeat.beat).start()
    code, idle = wait_for_step(hung, tmp_path, 0.5, lambda: (killed.append(1), hung.kill()), poll=0.05)
    assert killed and idle > 0.5 and code != 0
    assert wait_for_step(subprocess.Popen(["true"]), tmp_path, 0, lambda: None) == (0, None)
    heartbeat.start(is_main=False)  # other ranks, and runs outside Slurm, write nothing
    monkeypatch.delenv(HEARTBEAT_ENV)
    heartbeat.start(is_main=True)
    heartbeat.beat()


def test_job_settings_carry_the_retry_budget_and_the_hang_limit():
    settings = JobSettings(env={"A": "1"}, retries=1, hang_seconds=90.0)
    assert JobSettings.from_json(settings.to_json()) == settings
    assert JobSettings.from_json('{"env": {}}') == JobSettings()


def test_a_site_whose_ephemeral_range_starts_low_still_gets_a_free_port(monkeypatch):
    from launcher.distributed import rendezvous

    monkeypatch.setattr(rendezvous, "ephemeral_range", lambda: (10000, 40000))
    port = pick_rendezvous_port(7)
    assert 40000 < port < 65536
    monkeypatch.setattr(rendezvous, "ephemeral_range", lambda: (1024, 65535))
    assert 0 < pick_rendezvous_port(7) < 65536  # the kernel's choice
