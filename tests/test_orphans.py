"""No orphans: when the launcher dies unannounced (SIGKILL, the OOM killer), its workers stop too.

The fast tests check the two mechanisms of launcher/distributed/lifetime.py on plain Python
processes; the slow ones kill `tunefleet run` or its accelerate agent in a real two-process run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher.distributed.lifetime import LAUNCHER_PID_ENV, alive
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]


def processes() -> dict[int, str]:
    """Every live (not zombie) process but this one: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


def processes_mentioning(text: str) -> list[int]:
    return [pid for pid, cmdline in processes().items() if text in cmdline]


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A "worker": ties itself to its launcher, then waits; SIGTERM (its graceful stop) exits 75.
WORKER = textwrap.dedent("""
    import signal, sys, time
    from launcher.distributed.lifetime import tie_worker_to_launcher
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    tie_worker_to_launcher(interval_s=0.2)
    print("tied", flush=True)
    time.sleep(120)
""")
# Its parent, standing in for the accelerate agent: starts the worker and waits.
AGENT = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print(worker.pid, flush=True)
    time.sleep(120)
""")

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def start_agent(tag: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    agent = subprocess.Popen([sys.executable, "-c", AGENT, WORKER, tag], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    worker = int(agent.stdout.readline())
    assert wait_for(lambda: alive(worker), 10)
    return agent, worker


def test_worker_stops_when_its_parent_is_killed(tmp_path):
    agent, worker = start_agent(f"tag-{tmp_path.name}")
    try:
        time.sleep(2)  # let the worker tie itself (import, prctl, watchdog)
        agent.kill()
        agent.wait()
        assert wait_for(lambda: not alive(worker), 10), "the worker outlived its parent"
    finally:
        kill_all([worker])


def test_worker_stops_when_the_cli_is_gone(tmp_path):
    """The worker's parent lives on; the `tunefleet run` named in TUNEFLEET_LAUNCHER_PID dies."""
    cli = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    agent, worker = start_agent(f"tag-{tmp_path.name}", env={LAUNCHER_PID_ENV: str(cli.pid)})
    try:
        time.sleep(2)
        cli.kill()
        cli.wait()
        assert wait_for(lambda: not alive(worker), 10), "the worker outlived the CLI"
        assert agent.poll() is None  # only the watchdog acted: the parent is still there
    finally:
        kill_all([worker, agent.pid])
        agent.wait()


def test_alive_tells_running_from_dead_and_zombie():
    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_for(lambda: not alive(child.pid), 10)  # exited, not yet reaped: a zombie
    child.wait()
    assert not alive(child.pid)


# ---------------------------------------------------------------- a real two-process run

def start_run(tiny_llama: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    from launcher.distributed.rendezvous import free_port

    argv = [sys.executable, "-m", "launcher.cli", "run", "recipe=lora", f"model.name={tiny_llama}",
            "train.max_steps=5000", "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]",
            "data.max_samples=200", "distributed.num_processes=2", f"distributed.main_process_port={free_port()}",
            f"output.dir={run_dir}"]
    # Output to a file: a pipe nobody reads any more would block the workers once the test stops reading.
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def workers_of(run_dir: Path) -> list[int]:
    """The processes of this run's workers (not the CLI nor the agent, whose command lines name it too),
    with their batch-building children (forks with the same command line)."""
    return [pid for pid, cmdline in processes().items()
            if str(run_dir) in cmdline and "launcher/run.py" in cmdline and " -m " not in cmdline]


def trainers_of(run_dir: Path) -> list[int]:
    """The training processes alone: workers whose parent is not a worker."""
    every = set(workers_of(run_dir))
    return [pid for pid in every if parent_of(pid) not in every]


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def agent_of(cli_pid: int) -> int:
    [agent] = [pid for pid, cmdline in processes().items()
               if parent_of(pid) == cli_pid and "accelerate.commands.launch" in cmdline]
    return agent


def assert_stopped_cleanly(run_dir: Path) -> None:
    """The run says it was interrupted (status.json, where written) and holds a complete checkpoint."""
    from launcher.train.checkpoint import complete_checkpoints

    status = run_dir / "status.json"
    if status.exists():
        assert json.loads(status.read_text())["state"] == "interrupted"
    assert complete_checkpoints(run_dir), f"no complete checkpoint in {run_dir}: {sorted(os.listdir(run_dir))}"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["cli", "agent"])
def test_killing_the_launcher_leaves_no_worker_training(victim, tiny_llama, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    cli = start_run(tiny_llama, run_dir, log)
    status_folder = None
    try:
        metrics = run_dir / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 90,
                        every=0.5), log.read_text()[-3000:]
        workers = trainers_of(run_dir)
        assert len(workers) == 2 and len(workers_of(run_dir)) == 4  # each with one batch builder (loader_workers=1)
        # The CLI's temporary folder: a killed CLI cannot remove it, so the test does.
        status_folder = Path(environment_of(workers[0])["TUNEFLEET_STATUS_FILE"]).parent
        if victim == "cli":
            cli.kill()  # SIGKILL: no handler runs, nothing is forwarded
        else:
            os.kill(agent_of(cli.pid), signal.SIGKILL)
        cli.wait(timeout=60)
        assert wait_for(lambda: not workers_of(run_dir), 60, every=0.5), \
            f"workers still alive 60 s after the {victim} was killed:\n{log.read_text()[-3000:]}"
        assert_stopped_cleanly(run_dir)
        if victim == "agent":
            assert "was killed by SIGKILL" in log.read_text()
    finally:
        kill_all(processes_mentioning(str(run_dir)))
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if status_folder is not None:
            shutil.rmtree(status_folder, ignore_errors=True)
