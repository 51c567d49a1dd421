"""Against a real Slurm: two slurmd "nodes" and a slurmctld on this machine, started by the tests
themselves (slurm/local-cluster.sh; installed first where missing). Marked `slurm` and `slow`.

Covers: a 2-node run forms one world-size-2 group and trains what one machine with two processes
trains (ZeRO-3 and FSDP2 here; tests/test_multinode.py checks every backend across two machines
without Slurm); a sweep as a job array watched through status and collected; a
multi-node job warned before its time limit checkpoints, requeues itself, resumes and ends with the
uninterrupted run's adapter; cancel; a failing run reported with its log tail and not requeued; a
search whose trials are Slurm jobs, one pruned by cancelling it.
"""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.distributed.rendezvous import free_port
from launcher.train.checkpoint import complete_checkpoints
from tests.helpers import BACKENDS, assert_same_adapter, read_jsonl, run_in_process, wait_for
from tests.slurm_cluster import TRAIN, job_env, scontrol_job, tunefleet, tunefleet_submit, wait_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
# The sharded backends: what two machines must agree on is spread over both (DDP jobs run in every test below).
NODE_BACKENDS = {name: BACKENDS[name] for name in ("zero3", "fsdp")}


@pytest.fixture(scope="module")
def one_process(tiny_llama, tmp_path_factory):
    """The same 3 steps in this process: micro batch 2 x accumulation 2 is the 2-node global batch of 4."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    run_in_process("lora", tiny_llama, out, *TRAIN, "train.max_steps=3")
    return out


def single_machine(tiny_llama, out: Path, *words) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
                           *TRAIN, *words, "distributed.num_processes=2", f"distributed.main_process_port={free_port()}",
                           f"output.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.parametrize("backend", list(NODE_BACKENDS))
def test_two_nodes_train_what_one_process_trains(backend, slurm, one_process, tiny_llama, tmp_path):
    env = job_env(slurm)
    run_dir = tmp_path / "slurm-run"
    tunefleet_submit(env, "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=3", *NODE_BACKENDS[backend],
           "cluster=local", "slurm.nodes=2", f"output.dir={run_dir}")
    wait_state(env, run_dir, {"finished", "failed"}, 300)
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    log = next((run_dir / "slurm").glob("slurm-*.out")).read_text()
    assert "node 0 of 2" in log and "node 1 of 2" in log
    assert_same_adapter(one_process, run_dir)


def test_sweep_runs_as_an_array_and_is_collected(slurm, tiny_llama, tmp_path):
    env = job_env(slurm)
    sweep = tmp_path / "sweep"
    done = tunefleet(env, "submit", "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=4",
               "eval.every_steps=2", "train.lr=1e-3,3e-3,1e-2,3e-2", "cluster=local", "slurm.array_parallelism=2",
               f"sweep.dir={sweep}")
    assert done.returncode == 0 and "job array" in done.stdout, done.stderr
    script = (sweep / "slurm" / "job.sbatch").read_text()
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert len(manifest["runs"]) == 4 and all("_" in r["job_id"] for r in manifest["runs"])
    seen: set[str] = set()
    wait_state(env, sweep, {"finished"}, 400, seen)
    # Two at a time: the others wait with Slurm's reason for it while two run.
    assert {"pending", "running", "finished", "JobArrayTaskLimit"} <= seen, seen
    # Nobody has called collect: the job submit queued behind the array (afterany) writes the results.
    assert wait_for(lambda: (sweep / "results.csv").exists(), 120), list((sweep / "slurm").iterdir())
    assert (sweep / "slurm" / f"collect-{manifest['collect_job_id']}.out").exists()
    assert tunefleet(env, "collect", str(sweep)).returncode == 0
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 4
    for row in rows:
        own = json.loads((sweep / row["run"] / "metrics.json").read_text())
        assert float(row["value"]) == pytest.approx(own["best"]["value"])
        assert list((sweep / row["run"] / "slurm").glob("slurm-*_*.out")), "each run logs into its own folder"
    assert "#SBATCH" in script


def test_a_job_warned_before_its_time_limit_checkpoints_requeues_and_matches(slurm, tiny_llama, tmp_path):
    env = job_env(slurm)
    run_dir = tmp_path / "preempted"
    words = ["recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=60", "data.max_samples=400"]
    job = tunefleet_submit(env, *words, "cluster=local", "slurm.nodes=2", f"output.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.5)
    # What Slurm does N seconds before the time limit with --signal=B:USR1@N.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _start_now_when_pending(env, job, 1)  # the job requeued itself
    wait_state(env, run_dir, {"finished"}, 300)
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    # Every node's launcher ended the first attempt with its checkpoint written, none was killed.
    assert "node 0: stopped for a requeue" in log and "node 1: stopped for a requeue" in log
    assert "Terminated" not in log and "exit code" not in log
    stopped = re.search(r"checkpoint \S+/step-(\d+) written after step", log)
    assert stopped and 5 <= int(stopped.group(1)) < 60, "stopped mid-training, not at the end"
    steps = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    single_machine(tiny_llama, tmp_path / "straight", "train.max_steps=60", "data.max_samples=400")
    assert_same_adapter(tmp_path / "straight", run_dir)


def _field(env, job: str, name: str) -> str:
    found = re.search(rf"\b{name}=(\S*)", scontrol_job(env, job))
    return found.group(1) if found else ""


def _start_now_when_pending(env, job: str, restarts: int, timeout: float = 120) -> None:
    """Wait for the job's requeue number `restarts`, then skip Slurm's hold before it may run again (about two
    minutes: its old credential is revoked until the first attempt has fully ended)."""
    assert wait_for(lambda: f"Restarts={restarts}" in scontrol_job(env, job) and "JobState=PENDING" in scontrol_job(env, job),
                    timeout), scontrol_job(env, job)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def test_cancel_and_failure_are_reported_and_failures_are_not_requeued(slurm, tiny_llama, tmp_path):
    env = job_env(slurm)
    long_run = tmp_path / "long"
    job = tunefleet_submit(env, "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=5000", "cluster=local",
                 f"output.dir={long_run}")
    metrics = long_run / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180)
    assert tunefleet(env, "cancel", str(long_run)).returncode == 0
    assert "cancelled" in wait_state(env, long_run, {"cancelled"}, 120)
    # Cancelled mid-training, the run checkpoints on the SIGTERM like a warned job, but is not requeued.
    assert wait_for(lambda: "JobState=CANCELLED" in scontrol_job(env, job), 60), scontrol_job(env, job)
    assert "Restarts=0" in scontrol_job(env, job)
    log = "".join(p.read_text() for p in (long_run / "slurm").glob("slurm-*.out"))
    assert "was cancelled, so it is not requeued" in log, log[-3000:]
    assert json.loads((long_run / "status.json").read_text())["state"] == "interrupted"
    # A sweep in which one run fails once its job starts (its data file vanishes after submission).
    data = tmp_path / "rows.jsonl"
    data.write_text((ROOT / "data" / "wordnet" / "definitions_train.jsonl").read_text())
    sweep = tmp_path / "sweep"
    done = tunefleet(env, "submit", "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=3",
               f"data.train=data/wordnet/definitions_train.jsonl,{data}", "cluster=local", f"sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    data.unlink()
    table = wait_state(env, sweep, {"finished", "failed"}, 240)
    failed = [line for line in table.splitlines() if " failed" in line]
    assert len(failed) == 1, table
    failed_job = json.loads((sweep / "manifest.json").read_text())["runs"][1]["job_id"]
    assert "Restarts=0" in scontrol_job(env, failed_job), "a failure is not requeued"
    tunefleet(env, "collect", str(sweep))
    failures = (sweep / "failures.md").read_text()
    assert "rows.jsonl does not exist" in failures, failures


def test_a_search_runs_its_trials_as_slurm_jobs_and_prunes_by_cancelling(slurm, tiny_llama, tmp_path):
    # One trial at a time, in a set order (a learning rate that learns, then two that cannot): after two
    # complete trials the third must be pruned at its first evaluation, by cancelling its job.
    env = job_env(slurm)
    spec = tmp_path / "search.yaml"
    spec.write_text(f"""
base: [recipe=lora, model.name={tiny_llama}, train.max_steps=6, eval.every_steps=2, "eval.sample_prompts=[]",
       data.max_samples=200, data.max_eval_samples=16, train.global_batch_size=4, train.micro_batch_size=2]
trials: 3
parallel: 1
sampler: random
pruner: median
enqueue: [{{train.lr: 3.0e-2}}, {{train.lr: 1.0e-7}}, {{train.lr: 1.0e-7}}]
space:
  train.lr: {{type: float, low: 1.0e-7, high: 3.0e-2, log: true}}
""")
    folder = tmp_path / "search"
    done = tunefleet(env, "search", str(spec), "executor=slurm", "cluster=local", f"search.dir={folder}")
    assert done.returncode == 0, done.stderr
    manifest = lambda: json.loads((folder / "manifest.json").read_text())  # noqa: E731
    deadline = time.time() + 400
    while time.time() < deadline and (len(manifest()["runs"]) < 3 or manifest()["runs"][-1]["state"] in
                                      ("running", "pruning")):
        time.sleep(2)
    runs = manifest()["runs"]
    assert manifest()["executor"] == "slurm"
    assert [r["state"] for r in runs] == ["finished", "finished", "pruned"], runs
    assert all(r["job_id"].isdigit() for r in runs)  # real Slurm job ids, one job per trial
    for record in runs:
        assert list((Path(record["run_dir"]) / "slurm").glob("slurm-*.out")), "each trial logs in its own folder"
    job = scontrol_job(env, runs[2]["job_id"])
    assert "JobState=CANCELLED" in job or not job, job  # pruned: its job was cancelled, not requeued
    table = tunefleet(env, "status", str(folder)).stdout
    assert "pruned (step 2)" in table and table.count("finished") == 2
    assert tunefleet(env, "collect", str(folder)).returncode == 0
    assert json.loads((folder / "search.json").read_text())["best"]["params"] == {"train.lr": 0.03}


def _array_tasks(env, array_id: str) -> dict[str, str]:
    """{ARRAY_TASK id: numeric job id} of the array's tasks still in the queue."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %A"], env=env, capture_output=True,
                         text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_warning_one_array_task_leaves_the_others_alone_and_threads_follow_the_cpus_given(slurm, tiny_llama, tmp_path):
    # In an array one task's own job id is the array's id; a warning to that task must requeue it alone.
    env = job_env(slurm)
    env.pop("OMP_NUM_THREADS")  # the job must size its threads itself, from the 1 CPU each task is given
    sweep = tmp_path / "sweep"
    done = tunefleet(env, "submit", "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=200",
               "data.max_samples=400", "train.lr=1e-3,2e-3", "cluster=local", "slurm.cpus_per_task=1",
               f"sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    array = json.loads((sweep / "manifest.json").read_text())["array_job_id"]
    runs = [sweep / r["name"] for r in json.loads((sweep / "manifest.json").read_text())["runs"]]
    training = lambda run: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3  # noqa: E731
    assert wait_for(lambda: all(training(r) for r in runs), 240), [p.read_text()[-2000:] for p in sweep.rglob("*.out")]
    tasks = _array_tasks(env, array)
    base = next(task for task, job_id in tasks.items() if job_id == array)  # the task that carries the array's id
    other = next(task for task in tasks if task != base)
    subprocess.run(["scancel", "--signal=USR1", "--batch", base], env=env, check=True)
    _start_now_when_pending(env, base, 1)
    wait_state(env, sweep, {"finished"}, 300)
    assert "Restarts=0" in scontrol_job(env, other), scontrol_job(env, other)
    by_task = {f"{array}_{i}": run for i, run in enumerate(runs)}
    other_log = "".join(p.read_text() for p in (by_task[other] / "slurm").glob("slurm-*.out"))
    assert "stop request" not in other_log and "resumed from" not in other_log, other_log[-3000:]
    base_log = "".join(p.read_text() for p in (by_task[base] / "slurm").glob("slurm-*.out"))
    assert f"requeueing job {base}" in base_log and "resumed from" in base_log, base_log[-3000:]
    for run in runs:
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r][-1] == 200
        assert json.loads((run / "ranks" / "rank0.json").read_text())["torch_threads"] == 1


def test_a_stop_before_training_requeues_and_its_checkpoint_may_outlast_torchruns_grace(slurm, tiny_llama, tmp_path):
    # Two processes on one node under torchrun's agent, which SIGKILLs its workers 30 s after a SIGTERM.
    # A warning while they still load ends them at once (nothing to save) and requeues the job; a warning
    # while they train gives them a checkpoint that takes 35 s (as a large model's does on a parallel file
    # system): the stop request reaches them as a file, not through the agent.
    env = {**job_env(slurm), "TUNEFLEET_TEST_CHECKPOINT_SECONDS": "35"}
    run_dir = tmp_path / "slow-checkpoint"
    job = tunefleet_submit(env, "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.global_batch_size=4",
                 "train.max_steps=400", "train.checkpoint_every=1000", "distributed.num_processes=2", "cluster=local",
                 f"output.dir={run_dir}")
    log = lambda: "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))  # noqa: E731
    assert wait_for(lambda: f"[tunefleet] job {job} on" in log(), 120), log()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _start_now_when_pending(env, job, 1, timeout=180)
    assert not complete_checkpoints(run_dir) and "stopped before training began" in log(), log()[-4000:]
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 180), log()[-4000:]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    assert wait_for(lambda: "Restarts=2" in scontrol_job(env, job), 180), log()[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] > 0, status
    assert [p.name for p in complete_checkpoints(run_dir)] == [f"step-{status['step']:08d}"]
    text = log()
    assert "SIGKILL" not in text and "exit code" not in text, text[-4000:]
    subprocess.run(["scancel", job], env=env)

def test_gpus_asked_for_where_cuda_is_missing_stop_the_run_at_once_naming_the_node(slurm, tiny_llama, tmp_path):
    # The local cluster schedules two stand-in GPUs per node (gres type "fake"): Slurm sets
    # SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES as at a GPU site, but there is no CUDA behind them.
    env = job_env(slurm)
    run_dir = tmp_path / "gpu-run"
    job = tunefleet_submit(env, "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=3", "cluster=local",
                 "slurm.gpus_per_node=fake:2", "slurm.retries=0", f"output.dir={run_dir}")
    assert wait_for(lambda: "JobState=FAILED" in scontrol_job(env, job), 120), scontrol_job(env, job)
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert "node node1 was given 2 GPU(s) but CUDA is not available there" in log, log[-3000:]
    # The node's fault, not the recipe's: a retry without node1 would follow, were any allowed.
    assert "GPU fault on node1, not the recipe's" in log and "not retried: slurm.retries=0" in log, log[-3000:]
    assert "Restarts=0" in scontrol_job(env, job) and not (run_dir / "metrics.jsonl").exists()
    assert "#SBATCH --gpus-per-node=fake:2" in (run_dir / "slurm" / "job.sbatch").read_text()


def test_a_machine_failure_is_retried_without_its_node_and_a_hang_is_ended_and_retried(slurm, tiny_llama, tmp_path):
    # Injected (tunefleet's fault hooks; no GPU here): attempt 0 raises the CUDA error of a failing GPU
    # after step 3, attempt 1 stops making progress after step 5; attempt 2 trains to the end.
    env = {**job_env(slurm), "TUNEFLEET_TEST_FAULT": "gpu@3/0,hang@5/1"}
    run_dir = tmp_path / "flaky"
    job = tunefleet_submit(env, "recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=20",
                 "train.checkpoint_every=2", "cluster=local", "slurm.retries=2", "slurm.hang_minutes=0.25",
                 f"output.dir={run_dir}")
    _start_now_when_pending(env, job, 1)
    first = json.loads((run_dir / "slurm" / "retries.json").read_text())[0]
    assert first["kind"] == "GPU fault" and len(first["nodes"]) == 1, first
    bad = first["nodes"][0]
    assert wait_for(lambda: _field(env, job, "ExcNodeList") == bad, 60), scontrol_job(env, job)  # the exclusion job did it
    _start_now_when_pending(env, job, 2)
    assert _field(env, job, "ExcNodeList") == bad
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
    wait_state(env, run_dir, {"finished", "failed"}, 240)
    retries = json.loads((run_dir / "slurm" / "retries.json").read_text())
    assert [r["kind"] for r in retries] == ["GPU fault", "hang"], retries
    assert _field(env, job, "NodeList") != bad and "Restarts=2" in scontrol_job(env, job)
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert f"the next attempt runs without {bad}" in log and "no new step for" in log, log[-4000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 20 and log.count("resumed from") == 2
