"""`tunefleet logs`: a run's Slurm logs in job order across requeues and resubmissions, a sweep's
last lines, the local executor's local.log, and `-f` following a run until it has ended."""

import json
import threading
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.outputs.status import write_status
from tests.fake_slurm import FakeSlurm


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    return FakeSlurm(tmp_path / "fake-slurm", monkeypatch)


def slurm_run(folder: Path, job: str) -> Path:
    (folder / "slurm").mkdir(parents=True)
    (folder / "submission.json").write_text(json.dumps({"job_id": job, "state": "submitted", "executor": "slurm"}))
    return folder


def test_a_run_prints_every_slurm_log_in_job_order(tmp_path, slurm, capsys):
    run = slurm_run(tmp_path / "run", "100")
    # Job 99, requeued once (appended to its own file), then the run resubmitted as job 100:
    # by name "slurm-100" sorts before "slurm-99".
    (run / "slurm" / "slurm-99.out").write_text("first start\nrequeued: resumed from step 4\n")
    (run / "slurm" / "slurm-100.out").write_text("resubmitted\nfinished\n")
    assert main(["logs", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.index("first start") < out.index("requeued: resumed") < out.index("resubmitted")
    assert f"==> {run / 'slurm' / 'slurm-99.out'} <==" in out


def test_a_sweep_lists_each_runs_last_lines_and_a_local_run_prints_local_log(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    runs = []
    for i in range(2):
        run_dir = sweep / f"lr-{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "local.log").write_text("".join(f"line {n} of run {i}\n" for n in range(30)))
        runs.append({"name": f"lr-{i}", "run_dir": str(run_dir), "job_id": f"local-{i}", "state": "finished"})
    (sweep / "manifest.json").write_text(json.dumps({"sweep_dir": str(sweep), "executor": "local", "runs": runs}))
    assert main(["logs", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "==> lr-1" in out and "line 29 of run 1" in out and "line 0 of run 1" not in out
    assert main(["logs", str(sweep / "lr-0")]) == 0
    assert capsys.readouterr().out.count("of run 0") == 30


def test_bad_targets_are_one_line(tmp_path, capsys):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "manifest.json").write_text(json.dumps({"executor": "local", "runs": []}))
    for words, message in [([], "usage: tunefleet logs"), ([str(tmp_path)], "not a run folder"),
                           ([str(tmp_path / "sweep" / "nope")], "has no run nope"),
                           ([str(tmp_path / "sweep"), "-f"], "follow one of its runs"),
                           ([str(tmp_path / "sweep"), "--tail"], "unknown option --tail")]:
        assert main(["logs", *words]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err


def test_follow_prints_what_is_appended_and_ends_when_the_job_left_the_queue(tmp_path, slurm, monkeypatch, capsys):
    monkeypatch.setattr("launcher.cluster.logs.FOLLOW_POLL_S", 0.05)
    run = slurm_run(tmp_path / "run", "100")
    log = run / "slurm" / "slurm-100.out"
    log.write_text("step 1\n")
    slurm.set_job("100", "RUNNING", nodes="node1")
    write_status(run, "interrupted")  # stopped by a warning: Slurm requeues it

    def job():
        time.sleep(0.3)
        with log.open("a") as f:
            f.write("step 2, then a warning: checkpoint\n")
        slurm.set_job("100", "PENDING", reason="BeginTime", restarts=1)  # requeued: not ended
        time.sleep(0.3)
        slurm.set_job("100", "RUNNING", nodes="node2", restarts=1)
        with log.open("a") as f:
            f.write("resumed from step 2\nstep 3\n")
        write_status(run, "finished")
        slurm.set_job("100", "COMPLETED", restarts=1)

    writer = threading.Thread(target=job)
    writer.start()
    started = time.time()
    assert main(["logs", str(run), "-f"]) == 0
    writer.join()
    assert time.time() - started < 10
    out = capsys.readouterr().out
    assert out == "step 1\nstep 2, then a warning: checkpoint\nresumed from step 2\nstep 3\n"
