"""`tunefleet status`, `cancel` and `collect` against stand-in Slurm commands (tests/fake_slurm.py):
one scheduler query per sweep per poll, `--watch` ending however the runs ended, nodes and the last
log line shown, a silent squeue not read as "the jobs ended", a running sweep not collected as failed."""

import json
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.outputs.status import write_status
from tests.fake_slurm import FakeSlurm

WATCH_S = 7.0  # the --watch interval: the test's stand-in for time.sleep answers only this one
real_sleep = time.sleep


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    return FakeSlurm(tmp_path / "fake-slurm", monkeypatch)


def sweep_of(folder: Path, n: int, array: str = "101") -> Path:
    runs = []
    for i in range(n):
        run_dir = folder / f"run-{i}"
        (run_dir / "slurm").mkdir(parents=True)
        runs.append({"name": f"run-{i}", "run_dir": str(run_dir), "overrides": {"train.lr": str(i)},
                     "job_id": f"{array}_{i}", "state": "submitted", "restarts": 0})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"sweep_dir": str(folder), "executor": "slurm", "runs": runs}))
    return folder


def table_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith(" ")}


def test_status_asks_slurm_a_constant_number_of_times_per_poll_whatever_the_sweep_size(tmp_path, slurm, capsys):
    counts = []
    for n in (4, 24):
        sweep = sweep_of(tmp_path / f"sweep-{n}", n, array=str(100 + n))
        for i in range(n):  # running, pending, ended while remembered, and forgotten by Slurm
            if i % 4 == 0:
                slurm.set_job(f"{100 + n}_{i}", "RUNNING", nodes="node1")
            elif i % 4 == 1:
                slurm.set_job(f"{100 + n}_{i}", "PENDING", reason="Priority")
            elif i % 4 == 2:
                slurm.set_job(f"{100 + n}_{i}", "COMPLETED")
                write_status(sweep / f"run-{i}", "finished")
        slurm.clear_calls()
        assert main(["status", str(sweep)]) == 0
        counts.append(len(slurm.calls()))
        assert len(table_rows(capsys.readouterr().out)) == n
    assert counts[0] == counts[1] <= 2, f"scheduler calls per poll for 4 and 24 runs: {counts}"
    assert counts == [2, 2]  # squeue for them all, sacct for the ones Slurm forgot


@pytest.mark.parametrize("ending", ["TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                                    "CANCELLED", "FAILED"])
def test_watch_ends_when_every_run_has_ended_however_it_ended(tmp_path, slurm, monkeypatch, capsys, ending):
    sweep = sweep_of(tmp_path / "sweep", 3)
    slurm.set_job("101_0", ending, exit_code="0:9")
    slurm.set_job("101_1", "COMPLETED")
    write_status(sweep / "run-1", "finished")
    manifest = json.loads((sweep / "manifest.json").read_text())
    manifest["runs"][2].update(state="pruned", pruned_at=4)  # a search stopped it; Slurm forgot the job
    (sweep / "manifest.json").write_text(json.dumps(manifest))

    def still_watching(seconds):
        if seconds == WATCH_S:
            raise AssertionError("--watch went on although every run has ended")
        real_sleep(seconds)

    monkeypatch.setattr("time.sleep", still_watching)
    assert main(["status", str(sweep), "--watch", str(WATCH_S)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["run-0"].split()[3] == ending.lower() and "pruned (step 4)" in rows["run-2"]


def test_watch_goes_on_while_a_run_is_requeued_or_squeue_is_silent(tmp_path, slurm, monkeypatch, capsys):
    sweep = sweep_of(tmp_path / "sweep", 2)
    slurm.set_job("101_0", "COMPLETED")
    write_status(sweep / "run-0", "finished")
    slurm.set_job("101_1", "PENDING", reason="BeginTime", restarts=1)  # requeued after a warning
    write_status(sweep / "run-1", "interrupted")
    polls = []

    def sleep(seconds):
        if seconds != WATCH_S:
            return real_sleep(seconds)
        polls.append(1)
        if len(polls) == 1:
            slurm.squeue_down = True  # the controller stops answering: nothing has ended for that
        elif len(polls) == 2:
            slurm.squeue_down = False
            slurm.set_job("101_1", "COMPLETED", restarts=1)
            write_status(sweep / "run-1", "finished")

    monkeypatch.setattr("time.sleep", sleep)
    assert main(["status", str(sweep), "--watch", str(WATCH_S)]) == 0
    assert len(polls) == 2
    captured = capsys.readouterr()
    assert "pending (BeginTime)" in captured.out
    assert "the scheduler did not answer (squeue exited with status 1: slurm_load_jobs error: Unable to contact" \
        in captured.err


def test_status_shows_the_nodes_the_pending_reason_and_the_last_log_line_of_runs_going(tmp_path, slurm, capsys):
    sweep = sweep_of(tmp_path / "sweep", 3)
    slurm.set_job("101_0", "RUNNING", nodes="node[1-2]", restarts=1)
    slurm.set_job("101_1", "PENDING", reason="Resources")
    slurm.set_job("101_2", "FAILED", exit_code="1:0")
    write_status(sweep / "run-2", "failed")
    (sweep / "run-0" / "slurm" / "slurm-101_0.out").write_text("loading\nstep 1 loss 2.0\rstep 2 loss 1.5\n\n")
    (sweep / "run-2" / "slurm" / "slurm-101_2.out").write_text("Traceback\nValueError: boom\n")
    assert main(["status", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "overrides", "job", "state", "nodes"]
    running = next(i for i, line in enumerate(lines) if line.startswith("run-0"))
    assert "running" in lines[running] and "node[1-2]" in lines[running]
    assert lines[running + 1] == "    > step 2 loss 1.5"  # what the terminal last showed of the run
    assert "pending (Resources)" in next(line for line in lines if line.startswith("run-1"))
    assert not any("boom" in line for line in lines), "an ended run's log is for tunefleet logs, not the table"


def test_collect_on_a_sweep_still_going_reports_no_failure(tmp_path, slurm, capsys):
    from launcher.cluster.collect import collect

    sweep = sweep_of(tmp_path / "sweep", 4)
    slurm.set_job("101_0", "CONFIGURING", nodes="node1")  # nodes booting
    slurm.set_job("101_1", "COMPLETING", nodes="node1")
    slurm.set_job("101_2", "PENDING", reason="BeginTime")
    slurm.set_job("101_3", "RUNNING", nodes="node2")
    write_status(sweep / "run-3", "running")
    summary = collect(sweep)
    assert summary["failed"] == []
    assert (sweep / "failures.md").read_text() == "No run failed.\n"
