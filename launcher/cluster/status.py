"""`tunefleet status` and `tunefleet cancel`: what each run of a sweep (or one submitted run) is doing.

    tunefleet status runs/sweep-20261123-101500 [--watch [SECONDS]]
    tunefleet cancel runs/sweep-20261123-101500

A run's state combines the scheduler's view (pending with its reason, running) with the run's own
RUN/status.json (finished, failed, interrupted) and RUN/metrics.jsonl (step, latest loss, best
eval metric). Needs no Slurm accounting.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from launcher.cluster.executor import executor_for
from launcher.cluster.sweep import read_manifest, write_manifest
from launcher.distributed.lifetime import alive
from launcher.errors import UserError
from launcher.outputs.status import read_status

COLUMNS = ("run", "overrides", "job", "state", "restarts", "step", "loss", "best eval", "elapsed")
ENDED_BY_SCHEDULER = {"cancelled", "failed", "timeout", "node_fail", "out_of_memory", "boot_fail", "deadline",
                      "preempted"}


def _metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return rows


def run_progress(run_dir: Path) -> dict:
    """Step, total, latest loss, best eval metric and elapsed time, from the run's own files."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    rows = _metrics_rows(run_dir)
    losses = [r for r in rows if "loss" in r]
    progress = {"run_status": status.get("state"), "step": status.get("step"), "total": status.get("total_steps"),
                "loss": losses[-1]["loss"] if losses else None, "best": None, "elapsed": None}
    if losses and (progress["step"] is None or losses[-1]["step"] > progress["step"]):
        progress["step"] = losses[-1]["step"]
    summary = run_dir / "metrics.json"
    if summary.is_file():
        result = json.loads(summary.read_text())
        progress["elapsed"] = result.get("runtime_s")
        if result.get("best"):
            progress["best"] = f"{result['best']['metric']}={result['best']['value']:.4f}"
    if progress["best"] is None:
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        progress["best"] = f"eval_loss={min(evals):.4f}" if evals else None
    recipe_file = run_dir / "recipe.yaml"
    if progress["elapsed"] is None and recipe_file.is_file():
        progress["elapsed"] = time.time() - recipe_file.stat().st_mtime
    return progress


def run_state(record: dict, queued: dict[str, dict], executor) -> tuple[str, int]:
    """(state, restarts) of one manifest record."""
    job = record.get("job_id")
    details = {}
    if job and job in queued:
        entry = queued[job]
        state = entry["state"] + (f" ({entry['reason']})" if entry["state"] == "pending" and entry["reason"] else "")
        details = {} if entry["state"] == "pending" else executor.job_details(job)
        return state, details.get("restarts", record.get("restarts", 0))
    own = read_status(Path(record["run_dir"])).get("state")
    if record.get("state") in ("pruned", "pruning"):  # a search stopped it (launcher.search.driver)
        return f"pruned (step {record.get('pruned_at', '?')})", record.get("restarts", 0)
    if record.get("state") == "cancelled" and own != "finished":
        return "cancelled", record.get("restarts", 0)
    if job:
        details = executor.job_details(job)
    if not details and record.get("state") == "failed":
        details = {"state": "failed", "exit_code": str(record.get("exit_code", ""))}
    restarts = details.get("restarts", record.get("restarts", 0))
    scheduler_state = details.get("state", "")
    if own in ("finished", "failed"):
        return own, restarts
    if scheduler_state in ENDED_BY_SCHEDULER:
        return scheduler_state + (f" (exit {details['exit_code']})" if details.get("exit_code") else ""), restarts
    if own:
        return own, restarts
    return scheduler_state or record.get("state", "unknown"), restarts


def gather(path: Path) -> tuple[dict, list[dict]]:
    manifest = read_manifest(path)
    executor = executor_for(manifest)
    queued = executor.queue_states(manifest)
    rows = []
    for record in manifest["runs"]:
        state, restarts = run_state(record, queued, executor)
        progress = run_progress(Path(record["run_dir"]))
        rows.append({"record": record, "state": state, "restarts": restarts, **progress})
    return manifest, rows


def _cell(row: dict, column: str) -> str:
    record = row["record"]
    if column == "run":
        return record["name"]
    if column == "overrides":
        return " ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items()) or "-"
    if column == "job":
        return str(record.get("job_id") or "-")
    if column == "step":
        return "-" if row["step"] is None else f"{row['step']}/{row['total'] or '?'}"
    if column == "loss":
        return "-" if row["loss"] is None else f"{row['loss']:.4f}"
    if column == "best eval":
        return row["best"] or "-"
    if column == "elapsed":
        return "-" if row["elapsed"] is None else time.strftime("%H:%M:%S", time.gmtime(row["elapsed"]))
    return str(row[column])


def format_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(row, c) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


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
        _, rows = gather(target)
        if watch:
            print("\033[2J\033[H", end="")
        print(format_table(rows), flush=True)
        if not watch or all(r["state"].split()[0] in ("finished", "failed", "cancelled") for r in rows):
            return 0
        time.sleep(interval)


def cmd_cancel(words: list[str]) -> int:
    target = _target(words)
    manifest, rows = gather(target)
    driver = manifest.get("supervisor_pid")
    if "search" in manifest and driver and alive(driver):
        os.kill(driver, signal.SIGTERM)  # the search's driver stops its trials itself (launcher.search.driver)
        print(f"[tunefleet] stopping the search: its driver stops the trials in flight (they checkpoint); "
              f"continue it with tunefleet search {target}")
        return 0
    live = [r for r in rows if r["state"].split()[0] in ("pending", "running", "requeued", "configuring",
                                                          "completing", "suspended")]
    if not executor_for(manifest).cancel(manifest, [r["record"]["job_id"] for r in live]):
        print(f"[tunefleet] cancelling {len(live)} of {len(rows)} run(s); they checkpoint and stop")
        return 0
    for row in live:
        row["record"]["state"] = "cancelled"
    if manifest.get("sweep_dir"):
        write_manifest(Path(manifest["sweep_dir"]), manifest)
    else:
        run_dir = Path(manifest["runs"][0]["run_dir"])
        record = json.loads((run_dir / "submission.json").read_text())
        if live:
            record["state"] = "cancelled"
            (run_dir / "submission.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[tunefleet] cancelled {len(live)} of {len(rows)} run(s)"
          + (": " + ", ".join(r["record"]["name"] for r in live) if live else " (nothing was queued or running)"))
    return 0
