"""Sweeps: the grid, run names, validation before anything is submitted, and the local executor's
manifest, status, cancel and collect on real tiny runs."""

import csv
import json
from pathlib import Path

import pytest

from launcher.cluster.submit import plan
from launcher.cluster.sweep import expand_grid, split_values, unique_names
from launcher.errors import UserError
from tests.helpers import wait_for


def test_comma_lists_expand_to_the_grid_and_brackets_keep_their_commas():
    assert split_values("[q_proj,v_proj]") == ["[q_proj,v_proj]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    grid = expand_grid(["recipe=lora,qlora", "train.lr=1e-4,2e-4,4e-4", "peft.target_modules=[q_proj,v_proj]"])
    assert len(grid) == 6 and grid[0] == {"recipe": "lora", "train.lr": "1e-4", "peft.target_modules": "[q_proj,v_proj]"}
    assert unique_names(grid)[:2] == ["recipe-lora_lr-1e-4", "recipe-lora_lr-2e-4"]


def test_names_stay_unique_when_values_differ_only_in_dropped_characters():
    names = unique_names(expand_grid(["eval.sample_prompts=[a b],[a;b]"]))
    assert len(set(names)) == 2


def test_one_invalid_run_stops_the_whole_sweep_before_submission(tmp_path):
    with pytest.raises(UserError, match=r"2 of 4 runs of the sweep are invalid; nothing was submitted") as err:
        plan(["recipe=lora,full", "peft.r=4,8", "cluster=local", f"sweep.dir={tmp_path}/s"])
    assert "peft.r" in str(err.value) and not (tmp_path / "s").exists()


def test_an_empty_value_in_a_list_is_named():
    with pytest.raises(UserError, match="trailing comma"):
        expand_grid(["train.lr=1e-4,"])


@pytest.mark.slow
def test_local_sweep_runs_reports_and_collects(tiny_llama, tmp_path, capsys):
    from launcher.cli import main

    sweep = tmp_path / "sweep"
    quick = [f"model.name={tiny_llama}", "train.max_steps=4", "eval.every_steps=2", "data.max_samples=200",
             "data.max_eval_samples=16", "eval.sample_prompts=[]"]
    assert main(["submit", "recipe=lora", "train.lr=1e-3,1e-2,3e-2", *quick, "executor=local", "local.parallel=2",
                 f"sweep.dir={sweep}"]) == 0
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert [r["overrides"] for r in manifest["runs"]] == [{"train.lr": v} for v in ("1e-3", "1e-2", "3e-2")]
    seen = set()

    def all_finished():
        capsys.readouterr()
        main(["status", str(sweep)])
        table = capsys.readouterr().out
        seen.update(word for line in table.splitlines()[1:] for word in line.split() if word in
                    ("pending", "running", "finished"))
        return table.count("finished") == 3

    assert wait_for(all_finished, 240), "the sweep did not finish"
    assert {"running", "finished"} <= seen
    assert main(["collect", str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    values = [float(r["value"]) for r in rows]
    assert values == sorted(values), "sorted by eval loss, best first"
    for row in rows:  # the table says what each run's own metrics say
        own = json.loads((sweep / row["run"] / "metrics.json").read_text())
        assert float(row["value"]) == pytest.approx(own["best"]["value"]) and int(row["steps"]) == own["steps"]
    assert f"best run: {rows[0]['run']}" in out and (sweep / "curves.png").stat().st_size > 10_000
    assert list((sweep / "tensorboard").iterdir())
    # Two runs train side by side: each sizes its threads to half of the cores, not to all of them.
    from launcher.distributed.cpus import cpu_budget

    for row in rows:
        record = json.loads((sweep / row["run"] / "ranks" / "rank0.json").read_text())
        assert record["torch_threads"] == max(1, cpu_budget({}) // 2), record


@pytest.mark.slow
def test_local_cancel_stops_running_and_queued_runs(tiny_llama, tmp_path, capsys):
    from launcher.cli import main

    sweep = tmp_path / "sweep"
    assert main(["submit", "recipe=lora", f"model.name={tiny_llama}", "train.max_steps=3000", "train.lr=1e-3,2e-3",
                 "eval.every_steps=null", "eval.sample_prompts=[]", "data.max_samples=400", "executor=local",
                 f"sweep.dir={sweep}"]) == 0
    first = sweep / "lr-1e-3" / "metrics.jsonl"
    assert wait_for(lambda: first.exists() and len(first.read_text().splitlines()) >= 2, 120)
    assert main(["cancel", str(sweep)]) == 0
    assert wait_for(lambda: all(r["state"] == "cancelled" for r in
                                  json.loads((sweep / "manifest.json").read_text())["runs"]), 90)
    capsys.readouterr()
    main(["status", str(sweep)])
    table = capsys.readouterr().out
    assert table.count("cancelled") == 2
    # The running one checkpointed on its way out; the queued one never started.
    assert json.loads((sweep / "lr-1e-3" / "status.json").read_text())["state"] == "interrupted"
    assert not (sweep / "lr-2e-3" / "metrics.jsonl").exists()


def test_a_sweep_file_crosses_its_grid_with_paired_values_and_the_command_line(tmp_path):
    from launcher.cluster.sweep import cross, load_sweep_file

    spec = tmp_path / "s.yaml"
    spec.write_text("base: [recipe=lora]\ngrid: {train.lr: [1e-4, 2e-4]}\n"
                    "paired: [{peft.r: 8, peft.alpha: 16}, {peft.r: 16, peft.alpha: 32}]\n")
    runs = load_sweep_file(str(spec))
    assert len(runs) == 4 and {(r["peft.r"], r["peft.alpha"]) for r in runs} == {("8", "16"), ("16", "32")}
    assert all(r["recipe"] == "lora" for r in runs)
    assert len(cross(runs, expand_grid(["train.seed=1,2"]))) == 8
    spec.write_text("grid: {train.lr: 1e-4}\n")
    with pytest.raises(UserError, match="non-empty list"):
        load_sweep_file(str(spec))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_file_plans(path, tmp_path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "tunefleet submit sweep=" in lines[1]
    sub = plan([f"sweep={path}", "executor=local", f"sweep.dir={tmp_path}/s"])
    assert len(sub.runs) > 1 and len({r.name for r in sub.runs}) == len(sub.runs)


@pytest.mark.parametrize("name", ["slurm", "local"])
def test_every_executor_implements_the_interface(name):
    import inspect

    from launcher.cluster.executor import Executor, executor_for

    module = executor_for({"executor": name})
    for member, spec in vars(Executor).items():
        if member.startswith("_") or not callable(spec):
            continue
        assert hasattr(module, member), f"{module.__name__} lacks {member}"
        expected = list(inspect.signature(spec).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(module, member)).parameters) == expected, member
