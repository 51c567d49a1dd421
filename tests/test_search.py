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
    path = write(tmp_path, f"""
base: [recipe=lora, train.max_steps=6, eval.every_steps=2, train.checkpoint_every=2, data.max_samples=200,
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
