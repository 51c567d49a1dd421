"""Reading run and sweep files (launcher.outputs.run_files): what a missing or half-written file means."""

import json

import pytest

from launcher.errors import UserError
from launcher.outputs.run_files import (BestEval, RunStatus, metric_points, read_manifest, read_metric_rows,
                                        read_status, read_summary, saved_artifact, write_submission)
from launcher.outputs.status import write_status


def test_status_as_written_missing_half_written_and_from_before_status_files(tmp_path):
    for name in ("written", "nothing", "half", "old"):
        (tmp_path / name).mkdir()
    write_status(tmp_path / "written", "interrupted", step=3, total_steps=8)
    assert read_status(tmp_path / "written") == RunStatus(state="interrupted", step=3, total_steps=8)
    assert read_status(tmp_path / "nothing") == RunStatus()
    (tmp_path / "half" / "status.json").write_text('{"state": "runn')
    assert read_status(tmp_path / "half").state == "unknown"
    (tmp_path / "old" / "metrics.json").write_text("{}")
    assert read_status(tmp_path / "old").state == "finished"


def test_metric_rows_skip_the_line_being_written(tmp_path):
    assert read_metric_rows(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "lo')
    assert read_metric_rows(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}]
    assert metric_points(tmp_path, "eval_loss") == [(2, 1.5)]


def test_summary_is_typed_and_absent_until_the_run_finishes(tmp_path):
    assert read_summary(tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"steps": 4, "train_loss": 1.25, "runtime_s": 9.5, "best": {"metric": "eval_loss", "value": 1.0, "step": 2},
         "eval_final": {"eval_loss": 1.1}, "trainable_params": 10}))
    summary = read_summary(tmp_path)
    assert (summary.steps, summary.train_loss, summary.runtime_s) == (4, 1.25, 9.5)
    assert summary.best == BestEval("eval_loss", 1.0, 2) and summary.eval_final == {"eval_loss": 1.1}
    (tmp_path / "metrics.json").write_text(json.dumps({"best": None, "eval_final": None}))
    assert read_summary(tmp_path).best is None and read_summary(tmp_path).eval_final == {}


def test_manifest_of_a_sweep_of_a_run_submitted_alone_and_of_neither(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "manifest.json").write_text(json.dumps({"sweep_dir": str(sweep), "executor": "local", "runs": []}))
    assert read_manifest(sweep)["executor"] == "local"
    run = tmp_path / "run"
    run.mkdir()
    (run / "submission.json").write_text(json.dumps({"job_id": "42", "words": ["recipe=lora"]}))
    assert read_manifest(run) == {"sweep_dir": None, "executor": "slurm", "runs": [
        {"name": "run", "run_dir": str(run), "overrides": {}, "job_id": "42", "words": ["recipe=lora"]}]}
    with pytest.raises(UserError, match="neither a sweep folder .no manifest.json. nor a submitted run"):
        read_manifest(tmp_path)


def test_the_artifact_is_best_when_kept_else_final_and_none_until_one_is_saved(tmp_path):
    """collect, a search's report and a run folder used as a model source all pick it here."""
    assert saved_artifact(tmp_path) is None
    (tmp_path / "final").mkdir()
    (tmp_path / "best.pending").mkdir()  # a best artifact being written is not one yet
    assert saved_artifact(tmp_path) is None  # final/ without its config: still being written elsewhere
    (tmp_path / "final" / "config.json").write_text("{}")
    assert saved_artifact(tmp_path) == tmp_path / "final"
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "adapter_config.json").write_text("{}")
    assert saved_artifact(tmp_path) == tmp_path / "best"


def test_a_submission_is_replaced_whole(tmp_path):
    write_submission(tmp_path, {"job_id": "7", "state": "submitted"})
    write_submission(tmp_path, {"job_id": "7", "state": "cancelled"})
    assert read_manifest(tmp_path)["runs"][0]["state"] == "cancelled"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]  # no temporary file left behind
