"""`tunefleet search`: the search file is checked before anything starts; a real search on the tiny
model samples, prunes from the runs' own evaluations, survives its driver being killed, and
`collect` reports the best trial from the study's journal."""

import json
import os
import signal
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.distributed.lifetime import alive
from launcher.errors import UserError
from launcher.search.space import check_spec, load_search_file
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return str(path)


GOOD = "base: [recipe=lora, eval.every_steps=10]\nspace:\n"


@pytest.mark.parametrize("space, message", [
    ("  train.lrr: {type: float, low: 1.0e-5, high: 1.0e-3}\n", "train.lrr"),  # a typo in a searched key
    ("  train.lr: {low: 1.0e-5, high: 1.0e-3}\n", "needs a type"),
    ("  train.lr: {type: float, low: 1.0e-3, high: 1.0e-5}\n", "low < high"),
    ("  train.lr: {type: float, low: 0, high: 1.0e-3, log: true}\n", "above 0"),
    ("  peft.r: {type: int, low: 4.5, high: 16}\n", "whole numbers"),
    ("  peft.r: {type: int, low: 4, high: 16, steps: 4}\n", "found ['steps']"),
    ("  train.scheduler: {type: choice, values: []}\n", "non-empty list"),
    ("  peft.r: {type: choice, values: [8, oops]}\n", "peft.r"),  # the recipe refuses r=oops
])
def test_a_bad_search_file_is_named_before_anything_runs(tmp_path, space, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_spec(load_search_file(write(tmp_path, GOOD + space)), [])


def test_file_level_mistakes_are_named(tmp_path):
    for text, message in [
        ("space: {}\n", "space"),
        (GOOD + "  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\ntrails: 3\n", "trails"),
        (GOOD + "  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\npruner: hyperband\n", "pruner is one of"),
        (GOOD + "  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\nenqueue: [{peft.r: 8}]\n", "not in space"),
        ("base: [recipe=lora]\nspace:\n  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\n", "eval.every_steps"),
    ]:
        with pytest.raises(UserError, match=message):
            check_spec(load_search_file(write(tmp_path, text)), [])
    with pytest.raises(UserError, match="no such search file"):
        load_search_file(str(tmp_path / "missing.yaml"))


def test_the_command_refuses_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, GOOD + "  train.lrr: {type: float, low: 1.0e-5, high: 1.0e-3}\n")
    assert main(["search", path, f"search.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.lrr" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_choices_are_stored_by_position_and_read_back_as_values(tmp_path):
    spec = load_search_file(write(tmp_path, GOOD + "  peft.target_modules: {type: choice, values: [[q_proj], all-linear]}\n"))
    [param] = spec.params
    assert param.stored("all-linear") == 1 and param.value_of({"peft.target_modules": 0}) == ["q_proj"]
    assert spec.words_for({"peft.target_modules": ["q_proj"]})[-1] == 'peft.target_modules=["q_proj"]'
    with pytest.raises(UserError, match="not one of"):
        param.stored("v_proj")


@pytest.mark.parametrize("path", sorted((ROOT / "searches").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_search_file_validates(path):
    assert path.read_text().splitlines()[1].startswith("#   tunefleet search searches/")
    spec = load_search_file(str(path))
    metric, direction = check_spec(spec, [])
    assert metric.startswith("eval_") and direction in ("minimize", "maximize")


def _study(folder: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(str(folder / "study.journal"))))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_a_search_prunes_survives_its_driver_dying_and_reports_the_best(tiny_llama, tmp_path, capsys):
    # Enqueued trials make the order certain: a learning rate that learns, then one that cannot (1e-7);
    # after two complete trials the median pruner must stop the next hopeless one at its first evaluation.
    # 16 steps leave the pruned trial 14 steps (seconds) to be stopped in: with 6, a loaded machine's
    # driver once polled after the pruned run had already finished its last 4 (one failure in the suite).
    path = write(tmp_path, f"""
base: [recipe=lora, train.max_steps=16, eval.every_steps=2, train.checkpoint_every=2, data.max_samples=200,
       data.max_eval_samples=16, "eval.sample_prompts=[]"]
trials: 4
parallel: 2
sampler: random
pruner: median
enqueue: [{{train.lr: 3.0e-2}}, {{train.lr: 1.0e-7}}, {{train.lr: 3.0e-2}}, {{train.lr: 1.0e-7}}]
space:
  train.lr: {{type: float, low: 1.0e-7, high: 3.0e-2, log: true}}
""")
    folder = tmp_path / "search"
    assert main(["search", path, f"model.name={tiny_llama}", f"search.dir={folder}"]) == 0

    # Kill the driver (SIGKILL: no clean-up) while trials run; the runs go on without it.
    assert wait_for(lambda: sum(r["state"] == "running" for r in _manifest(folder)["runs"]) == 2, 120)
    driver = _manifest(folder)["supervisor_pid"]
    os.kill(driver, signal.SIGKILL)
    assert wait_for(lambda: not alive(driver), 10)
    orphans = [r for r in _manifest(folder)["runs"] if r["state"] == "running"]
    assert orphans and all(alive(r["pid"]) for r in orphans)
    # One of them also stops (as a preempted run does: SIGTERM, it checkpoints and exits): the next
    # driver must start it again, in its own folder, where train.resume=auto picks up its checkpoint.
    stopped = orphans[0]
    os.kill(stopped["pid"], signal.SIGTERM)
    assert wait_for(lambda: not alive(stopped["pid"]), 60)
    # A driver may also die between asking Optuna for a trial and recording its run: the next starts it.
    asked = _study(folder).ask().number
    assert asked == 2 and len(_manifest(folder)["runs"]) == 2
    assert main(["search", str(folder), "train.lr=1"]) == 2  # continuing takes no new words
    assert main(["search", str(folder)]) == 0
    assert wait_for(lambda: _manifest(folder)["supervisor_pid"] != driver, 30), "no new driver took over"

    assert wait_for(lambda: not alive(_manifest(folder)["supervisor_pid"]), 300), "the search did not end"
    manifest = _manifest(folder)
    assert [r["name"] for r in manifest["runs"]] == [f"trial-{i:03d}" for i in range(4)]  # none twice, none lost
    states = {r["name"]: r["state"] for r in manifest["runs"]}
    assert states == {"trial-000": "finished", "trial-001": "finished", "trial-002": "finished", "trial-003": "pruned"}
    pruned = manifest["runs"][3]
    assert pruned["pruned_at"] == 2
    assert json.loads((folder / "trial-003" / "status.json").read_text())["state"] != "finished"

    # Started again by the new driver (a new process; it may have been stopped before its first line).
    assert manifest["runs"][stopped["trial"]]["pid"] != stopped["pid"]
    assert (folder / stopped["name"] / "best").is_dir()

    study = _study(folder)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[asked].params == {"train.lr": 3.0e-2}  # its enqueued values, not a new draw
    for trial in study.trials[:3]:  # each value is what the run itself recorded as its best
        own = json.loads((folder / f"trial-{trial.number:03d}" / "metrics.json").read_text())
        assert trial.value == pytest.approx(own["best"]["value"])
        assert set(trial.intermediate_values) >= {2, 4, 6}

    capsys.readouterr()
    assert main(["status", str(folder)]) == 0
    assert "pruned (step 2)" in capsys.readouterr().out
    assert main(["collect", str(folder)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((folder / "search.json").read_text())
    assert summary["best"]["params"] == {"train.lr": 0.03} and summary["best"]["artifact"].endswith("best")
    assert summary["counts"] == {"complete": 3, "pruned": 1, "fail": 0, "running": 0}
    assert "Best: trial 0" in out or "Best: trial 2" in out
    assert (folder / "search.png").stat().st_size > 10_000
    assert "did not finish" not in out  # pruned is not failed


@pytest.mark.slow
def test_cancel_stops_the_search_and_continuing_resumes_its_trial_from_a_checkpoint(tiny_llama, tmp_path, capsys):
    path = write(tmp_path, """
base: [recipe=lora, train.max_steps=150, train.checkpoint_every=3, eval.every_steps=75, data.max_samples=200,
       data.max_eval_samples=16, "eval.sample_prompts=[]", eval.at_start=false]
trials: 1
pruner: none
space:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
""")
    folder = tmp_path / "search"
    assert main(["search", path, f"model.name={tiny_llama}", f"search.dir={folder}"]) == 0
    metrics = folder / "trial-000" / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 120)
    driver = _manifest(folder)["supervisor_pid"]
    assert main(["cancel", str(folder)]) == 0
    assert "stopping the search" in capsys.readouterr().out
    assert wait_for(lambda: not alive(driver), 90)
    [record] = _manifest(folder)["runs"]
    assert record["state"] == "cancelled" and not alive(record["pid"])
    assert json.loads((folder / "trial-000" / "status.json").read_text())["state"] == "interrupted"
    assert [t.state.name for t in _study(folder).trials] == ["RUNNING"]  # open: a continued search resumes it

    assert main(["search", str(folder)]) == 0
    assert wait_for(lambda: _manifest(folder)["supervisor_pid"] != driver, 30)
    assert wait_for(lambda: not alive(_manifest(folder)["supervisor_pid"]), 240), "the search did not end"
    assert [t.state.name for t in _study(folder).trials] == ["COMPLETE"]
    assert _manifest(folder)["runs"][0]["state"] == "finished"
    assert "] resumed from" in (folder / "trial-000" / "local.log").read_text()


# ---------------------------------------------------------------------------- faults, injected


class Killed(BaseException):
    """The driver process dying at this instant (nothing after it runs, nothing in memory survives)."""


class InstantTrials:
    """Trials that run at once: started, a run writes two evaluations and its result, and has ended by
    the next poll. `world` is shared by every driver of a test, as the cluster would be."""

    world: dict = {}

    def __init__(self, _words):
        pass

    def start(self, record):
        if self.world.get("busy", 0) > 0:
            from launcher.cluster.submit import SchedulerBusy

            self.world["busy"] -= 1
            raise SchedulerBusy("sbatch refused the job: Socket timed out on send/recv operation")
        if self.world["refuse"]:
            raise UserError("sbatch refused the job: Invalid account or account/partition combination specified")
        run_dir = Path(record["run_dir"])
        value = 1.0 + record["trial"] / 10
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": value}) + "\n" for s in (2, 4)))
        (run_dir / "metrics.json").write_text(json.dumps({"best": {"metric": "eval_loss", "value": value, "step": 4}}))
        self.world["started"].append(record["name"])
        record.update(job_id=f"job-{len(self.world['started'])}", pid=None)

    def refresh(self, records):
        pass

    def ended(self, record):
        return True

    def stop(self, record):
        pass

    def wait(self, record):
        pass


def new_search(tmp_path, monkeypatch, executor: str, trials: int, parallel: int, extra: str = "") -> Path:
    """A search folder as `tunefleet search` leaves it, its driver not started (the test runs one)."""
    from launcher.search import driver

    monkeypatch.setattr(driver, "_start_driver", lambda folder: 0)
    path = write(tmp_path, GOOD + f"  train.lr: {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}\n"
                                  f"trials: {trials}\nparallel: {parallel}\nsampler: random\n{extra}")
    folder = tmp_path / "search"
    words = ["cluster=local"] if executor == "slurm" else []
    assert main(["search", path, f"executor={executor}", *words, f"search.dir={folder}"]) == 0
    return folder


@pytest.fixture
def instant(monkeypatch):
    from launcher.search import driver

    monkeypatch.setitem(driver.EXECUTORS, "instant", InstantTrials)
    monkeypatch.setattr(driver, "POLL_S", 0.0)
    monkeypatch.setattr(InstantTrials, "world", {"refuse": False, "started": []})
    return InstantTrials.world


def test_a_driver_killed_right_after_pruning_leaves_a_search_that_continues(tmp_path, monkeypatch, instant):
    import optuna
    from optuna.trial import TrialState

    from launcher.search.driver import Driver

    folder = new_search(tmp_path, monkeypatch, "instant", trials=3, parallel=1)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 0)
    driver = Driver(folder)
    tell = driver.study.tell

    def tell_then_die(trial, *args, **kwargs):
        tell(trial, *args, **kwargs)
        if kwargs.get("state") == TrialState.PRUNED:
            raise Killed

    driver.study.tell = tell_then_die
    with pytest.raises(Killed):
        driver.drive()
    assert [t.state.name for t in _study(folder).trials] == ["PRUNED"]
    assert Driver(folder).drive() == 0  # the next driver finishes the pruning and goes on
    assert [r["state"] for r in _manifest(folder)["runs"]] == ["pruned", "finished", "finished"]
    assert [t.state.name for t in _study(folder).trials] == ["PRUNED", "COMPLETE", "COMPLETE"]
    assert _manifest(folder)["runs"][0]["pruned_at"] == 2


def test_a_continued_search_does_not_replay_its_first_suggestions(tmp_path):
    from launcher.search.driver import open_study

    spec = load_search_file(write(tmp_path, GOOD + "  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\n"
                                                   "sampler: random\n"))
    [param] = spec.params
    first = open_study(tmp_path, spec, "minimize")
    drawn = []
    for _ in range(3):
        trial = first.ask()
        drawn.append(param.suggest(trial))
        first.tell(trial, 1.0)
    continued = open_study(tmp_path, spec, "minimize")  # a new driver, the same journal
    again = [param.suggest(continued.ask()) for _ in range(3)]
    assert not set(again) & set(drawn), f"the continued search suggested {again} again"
    (tmp_path / "other").mkdir()
    fresh = open_study(tmp_path / "other", spec, "minimize")  # a new search keeps the file's seed
    assert param.suggest(fresh.ask()) == drawn[0]


def test_refused_submissions_stop_the_search_with_one_message_and_burn_no_trial(tmp_path, monkeypatch, instant):
    from launcher.search import driver

    monkeypatch.setattr(driver, "REFUSAL_RETRY_S", 0.0, raising=False)
    folder = new_search(tmp_path, monkeypatch, "instant", trials=6, parallel=2, extra="pruner: none\n")
    instant["refuse"] = True
    assert driver.Driver(folder).drive() == 1
    stopped = _manifest(folder)["search"]["stopped"]
    assert "3 submissions in a row were refused" in stopped and "Invalid account" in stopped
    assert f"continue with tunefleet search {folder}" in stopped
    trials = _study(folder).trials
    assert len(trials) <= 2 and all(t.state.name == "RUNNING" for t in trials), "a refusal is not a result"
    assert {r["state"] for r in _manifest(folder)["runs"]} == {"refused"}

    instant["refuse"] = False  # the account fixed: continuing submits the refused trials, then the rest
    assert driver.Driver(folder).drive() == 0
    manifest = _manifest(folder)
    assert "stopped" not in manifest["search"]
    assert [r["state"] for r in manifest["runs"]] == ["finished"] * 6
    assert [t.state.name for t in _study(folder).trials] == ["COMPLETE"] * 6


def test_a_busy_scheduler_delays_trials_but_never_halts_the_search(tmp_path, monkeypatch, instant):
    from launcher.search import driver

    monkeypatch.setattr(driver, "REFUSAL_RETRY_S", 0.0, raising=False)
    folder = new_search(tmp_path, monkeypatch, "instant", trials=3, parallel=1, extra="pruner: none\n")
    instant["busy"] = 5  # more time-outs in a row than refusals halt a search
    assert driver.Driver(folder).drive() == 0
    assert [r["state"] for r in _manifest(folder)["runs"]] == ["finished"] * 3


def test_a_driver_on_another_host_is_judged_by_its_heartbeat_and_stopped_by_a_request(tmp_path, monkeypatch,
                                                                                      instant, capsys):
    from launcher.search import driver

    folder = new_search(tmp_path, monkeypatch, "instant", trials=2, parallel=1)
    started = []
    monkeypatch.setattr(driver, "_start_driver", lambda f: started.append(f) or 4242)
    gone = 2 ** 22 + 17  # a pid nothing runs under here
    manifest = _manifest(folder)
    manifest.update(supervisor_pid=gone, supervisor_host="login-2")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "driver.heartbeat").touch()  # fresh: the driver on login-2 polled just now
    capsys.readouterr()
    assert main(["search", str(folder)]) == 2
    assert "still running" in capsys.readouterr().err and not started, "a second driver beside a live one"
    assert main(["cancel", str(folder)]) == 0
    assert "stopping the search" in capsys.readouterr().out
    assert (folder / "driver.stop").is_file(), "cancel asks a driver on another host through the folder"
    assert driver.Driver(folder).drive() == 0 and instant["started"] == []  # it reads the request, stops
    assert not (folder / "driver.stop").exists()

    manifest = _manifest(folder)
    manifest.update(supervisor_pid=1, supervisor_host="login-2")  # pid 1 lives here, but means nothing
    (folder / "manifest.json").write_text(json.dumps(manifest))
    os.utime(folder / "driver.heartbeat", (0, 0))  # stale: that driver is dead
    assert main(["search", str(folder)]) == 0 and started == [folder]


def test_a_silent_squeue_is_waited_out_not_read_as_trials_ending(tmp_path, monkeypatch):
    # A real driver process; stand-in Slurm commands on PATH (tests/fake_slurm.py) that the test
    # makes fail while two trials run, across a driver killed and continued in the silence.
    from launcher.search.driver import _start_driver
    from tests.fake_slurm import FakeSlurm

    slurm = FakeSlurm(tmp_path / "fake-slurm", monkeypatch)
    folder = new_search(tmp_path, monkeypatch, "slurm", trials=4, parallel=2, extra="pruner: none\n")
    metric = _manifest(folder)["search"]["metric"]

    def finish(job: str) -> None:
        record = next(r for r in _manifest(folder)["runs"] if r["job_id"] == job)
        (Path(record["run_dir"]) / "metrics.json").write_text(json.dumps({"best": {"metric": metric, "value": 1.0}}))
        slurm.set_job(job, "COMPLETED")

    def running() -> list[str]:
        return [r["job_id"] for r in _manifest(folder)["runs"] if r["state"] == "running"]

    driver = _start_driver(folder)
    assert wait_for(lambda: len(running()) == 2, 60), (folder / "search-driver.log").read_text()
    first = running()
    for job in first:
        slurm.set_job(job, "RUNNING", nodes="node1")
    slurm.squeue_down = True
    seen = len(slurm.calls("squeue"))
    assert wait_for(lambda: len(slurm.calls("squeue")) >= seen + 3, 30)  # it keeps asking
    os.kill(_manifest(folder)["supervisor_pid"], signal.SIGKILL)  # and dies in the silence
    assert wait_for(lambda: not alive(driver), 10)
    driver = _start_driver(folder)  # continued while squeue still fails
    seen = len(slurm.calls("squeue"))
    assert wait_for(lambda: len(slurm.calls("squeue")) >= seen + 3, 30)
    assert running() == first and len(slurm.calls("sbatch")) == 2, "a trial ended, or was submitted twice"
    assert [t.state.name for t in _study(folder).trials] == ["RUNNING", "RUNNING"]

    slurm.squeue_down = False
    for job in first:
        finish(job)
    assert wait_for(lambda: len(running()) == 2 and running() != first, 60)
    for job in running():
        finish(job)
    assert wait_for(lambda: not alive(driver), 60), (folder / "search-driver.log").read_text()
    assert [r["state"] for r in _manifest(folder)["runs"]] == ["finished"] * 4
    assert len(slurm.calls("sbatch")) == 4
    log = (folder / "search-driver.log").read_text()
    assert log.count("the scheduler did not answer") == 2 and "the scheduler answers again" in log  # once a driver
