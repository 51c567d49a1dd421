"""`tunefleet status` and `tunefleet cancel`: what each run of a sweep (or one submitted run) is doing.

    tunefleet status runs/sweep-20261123-101500 [--watch [SECONDS]]
    tunefleet cancel runs/sweep-20261123-101500

A run's state combines the scheduler's view (pending with its reason, running on its nodes, how it
ended) with the run's own RUN/status.json (finished, failed, interrupted) and RUN/metrics.jsonl
(step, latest loss, best eval metric); under each run still going, the last line of its log. One
scheduler query per sweep per poll, however many runs (launcher.cluster.executor). `--watch` ends
when every run has ended, however it ended. Needs no Slurm accounting.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.cluster.executor import JobView, SchedulerDidNotAnswer, executor_for
from launcher.cluster.sweep import write_manifest
from launcher.errors import UserError
from launcher.outputs.run_files import (read_manifest, read_metric_rows, read_status, read_submission, read_summary,
                                        write_submission)

COLUMNS = ("run", "overrides", "job", "state", "nodes", "restarts", "step", "loss", "best eval", "elapsed")


def run_progress(run_dir: Path) -> dict:
    """Step, total, latest loss, best eval metric and elapsed time, from the run's own files."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    rows = read_metric_rows(run_dir)
    losses = [r for r in rows if "loss" in r]
    progress = {"run_status": status.state, "step": status.step, "total": status.total_steps,
                "loss": losses[-1]["loss"] if losses else None, "best": None, "elapsed": None}
    if losses and (progress["step"] is None or losses[-1]["step"] > progress["step"]):
        progress["step"] = losses[-1]["step"]
    summary = read_summary(run_dir)
    if summary is not None:
        progress["elapsed"] = summary.runtime_s
        if summary.best:
            progress["best"] = f"{summary.best.metric}={summary.best.value:.4f}"
    if progress["best"] is None:
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        progress["best"] = f"eval_loss={min(evals):.4f}" if evals else None
    recipe_file = run_dir / "recipe.yaml"
    if progress["elapsed"] is None and recipe_file.is_file():
        progress["elapsed"] = time.time() - recipe_file.stat().st_mtime
    return progress


@dataclass(frozen=True)
class RunState:
    """One run as status shows it."""

    text: str  # pending (Priority), running, timeout (exit 0:0), pruned (step 4), ...
    ended: bool  # nothing more will happen to it unless someone continues it
    restarts: int = 0
    nodes: str = ""  # the nodes it holds while it runs


@dataclass
class RunRow:
    record: dict  # its manifest entry
    run: RunState
    progress: dict  # run_progress
    last_log_line: str

    @property
    def state(self) -> str:
        return self.run.text


@dataclass
class SweepView:
    manifest: dict
    rows: list[RunRow]
    scheduler_silence: str | None  # why the scheduler did not answer; None when it did


def _exit(view: JobView) -> str:
    return f" (exit {view.exit_code})" if view.exit_code not in ("", "0", "0:0") else ""


def run_state(record: dict, jobs: dict[str, JobView] | None) -> RunState:
    """State of one manifest record from the scheduler's view (`jobs`: None when it did not answer)
    and the run's own status.json."""
    view = jobs.get(str(record.get("job_id"))) if jobs is not None else None
    restarts = view.restarts if view else record.get("restarts", 0)
    if view and view.live:
        reason = f" ({view.reason})" if view.state == "pending" and view.reason else ""
        return RunState(view.state + reason, False, restarts, "" if view.state == "pending" else view.nodes)
    left = jobs is not None  # the scheduler answered and does not list the job as live
    own = read_status(Path(record["run_dir"])).state
    if record.get("state") in ("pruned", "pruning"):  # a search stopped it (launcher.search.driver)
        return RunState(f"pruned (step {record.get('pruned_at', '?')})", left or record["state"] == "pruned", restarts)
    if record.get("state") == "cancelled" and own != "finished":
        return RunState("cancelled", left, restarts)
    if own in ("finished", "failed"):
        return RunState(own, True, restarts)
    if view and view.state != "completed":  # timeout, node_fail, out_of_memory, preempted, cancelled, ...
        return RunState(view.state + _exit(view), True, restarts)
    if not view and record.get("state") == "failed":
        exit_code = record.get("exit_code")
        return RunState("failed" + (f" (exit {exit_code})" if exit_code not in (None, "") else ""), True, restarts)
    return RunState(own or (view.state if view else record.get("state", "unknown")), left, restarts)


def last_log_line(log: Path | None, width: int = 160) -> str:
    """The log's last non-empty line as a terminal last showed it (after the last carriage return)."""
    if log is None or not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 8192))
        tail = f.read().decode(errors="replace")
    lines = [line.rsplit("\r", 1)[-1].strip() for line in tail.splitlines()]
    line = next((line for line in reversed(lines) if line), "")
    return line if len(line) <= width else line[:width - 3] + "..."


def gather(path: Path) -> SweepView:
    """Every run of a sweep (or the one run), with one scheduler query for them all."""
    manifest = read_manifest(path)
    executor = executor_for(manifest)
    try:
        jobs, silence = executor.jobs(manifest), None
    except SchedulerDidNotAnswer as err:
        jobs, silence = None, str(err)
    rows = []
    for record in manifest["runs"]:
        run_dir = Path(record["run_dir"])
        logs = executor.log_files(run_dir)
        rows.append(RunRow(record, run_state(record, jobs), run_progress(run_dir),
                           last_log_line(logs[-1] if logs else None)))
    return SweepView(manifest, rows, silence)


def _cell(row: RunRow, column: str) -> str:
    record, progress = row.record, row.progress
    if column == "run":
        return record["name"]
    if column == "overrides":
        return " ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items()) or "-"
    if column == "job":
        return str(record.get("job_id") or "-")
    if column == "state":
        return row.run.text
    if column == "nodes":
        return row.run.nodes or "-"
    if column == "restarts":
        return str(row.run.restarts)
    if column == "step":
        return "-" if progress["step"] is None else f"{progress['step']}/{progress['total'] or '?'}"
    if column == "loss":
        return "-" if progress["loss"] is None else f"{progress['loss']:.4f}"
    if column == "best eval":
        return progress["best"] or "-"
    if column == "elapsed":
        return "-" if progress["elapsed"] is None else time.strftime("%H:%M:%S", time.gmtime(progress["elapsed"]))
    raise KeyError(column)


def format_table(rows: list[RunRow]) -> str:
    """One line per run; under a run that has not ended, the last line of its log (what it does now).
    Ended runs get none, so a finished table is one line per run (`tunefleet logs` shows the rest)."""
    cells = [list(COLUMNS)] + [[_cell(row, c) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(cells[0], widths)).rstrip()]
    for row, line in zip(rows, cells[1:]):
        lines.append("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        if not row.run.ended and row.last_log_line:
            lines.append(f"    > {row.last_log_line}")
    return "\n".join(lines)


def _target(words: list[str]) -> Path:
    paths = [w for w in words if not w.startswith("-")]
    if len(paths) != 1:
        raise UserError("give one sweep folder or run folder, e.g. tunefleet status runs/sweep-20261123-101500")
    return Path(paths[0])


def cmd_status(words: list[str]) -> int:
    target = _target([w for w in words if not w.replace(".", "").isdigit()])
    watch = "--watch" in words
    interval = next((float(w) for w in words if w.replace(".", "").isdigit()), 10.0)
    while True:
        sweep = gather(target)
        if watch:
            print("\033[2J\033[H", end="")
        print(format_table(sweep.rows), flush=True)
        if sweep.scheduler_silence:
            print(f"[tunefleet] the scheduler did not answer ({sweep.scheduler_silence}); states come from the "
                  "runs' own files", file=sys.stderr, flush=True)
        stopped = sweep.manifest.get("search", {}).get("stopped")
        if stopped:
            print(f"[tunefleet] the search's driver stopped: {stopped}")
        if not watch or all(row.run.ended for row in sweep.rows):
            return 0
        time.sleep(interval)


def cmd_cancel(words: list[str]) -> int:
    from launcher.search.presence import driver_seen, request_stop

    target = _target(words)
    manifest = read_manifest(target)
    driver = driver_seen(target, manifest) if "search" in manifest else None
    if driver and driver.running:
        # The search's driver stops its trials itself (launcher.search.driver): by a signal on its own
        # host, by the stop request it reads every poll on another.
        request_stop(target)
        if driver.here:
            os.kill(driver.pid, signal.SIGTERM)
        print(f"[tunefleet] stopping the search (driver {driver.describe()}): it stops the trials in flight (they "
              f"checkpoint); continue it with tunefleet search {target}")
        return 0
    sweep = gather(target)
    manifest, rows = sweep.manifest, sweep.rows
    live = [row for row in rows if not row.run.ended and row.record.get("job_id")]
    if not executor_for(manifest).cancel(manifest, [row.record["job_id"] for row in live]):
        print(f"[tunefleet] cancelling {len(live)} of {len(rows)} run(s); they checkpoint and stop")
        return 0
    for row in live:
        row.record["state"] = "cancelled"
    if manifest.get("sweep_dir"):
        write_manifest(Path(manifest["sweep_dir"]), manifest)
    else:
        run_dir = Path(manifest["runs"][0]["run_dir"])
        record = read_submission(run_dir)
        if live:
            record["state"] = "cancelled"
            write_submission(run_dir, record)
    print(f"[tunefleet] cancelled {len(live)} of {len(rows)} run(s)"
          + (": " + ", ".join(row.record["name"] for row in live) if live else " (nothing was queued or running)"))
    return 0
