"""`tunefleet logs`: a run's log, across requeues and resubmissions, whichever executor ran it.

    tunefleet logs runs/lora-slurm                # every RUN/slurm/slurm-*.out, oldest job first
    tunefleet logs runs/sweep-20261123-101500/lr-1e-4 -f   # and follow it until the run has ended
    tunefleet logs runs/sweep-20261123-101500     # the last lines of each run's log

A requeued Slurm job appends to its own file (--open-mode=append); a search trial started again is
a new job with a new file; the local executor writes RUN/local.log. `-f` prints what is appended
as it comes and ends by itself once the job has left the queue and the run's state is final (the
same judgement as `tunefleet status`, launcher.cluster.status).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from launcher.cluster.executor import SchedulerDidNotAnswer, executor_for
from launcher.cluster.status import run_state
from launcher.errors import UserError
from launcher.outputs.run_files import MANIFEST_FILE, SUBMISSION_FILE, has_submission, is_sweep, read_manifest

USAGE = "usage: tunefleet logs RUN | SWEEP | SWEEP/RUN [-f]"
SWEEP_TAIL_LINES = 5
FOLLOW_POLL_S = 1.0


def _split(words: list[str]) -> tuple[Path, bool]:
    follow = any(w in ("-f", "--follow") for w in words)
    unknown = [w for w in words if w.startswith("-") and w not in ("-f", "--follow")]
    paths = [w for w in words if not w.startswith("-")]
    if unknown or len(paths) != 1:
        raise UserError(f"unknown option {unknown[0]}; {USAGE}" if unknown else USAGE)
    return Path(paths[0]), follow


def _run_target(path: Path) -> tuple[Path, str]:
    """(the folder whose manifest holds the run, the run's name) for a run folder: one submitted
    alone (its own submission.json) or one inside a sweep."""
    if has_submission(path) and not is_sweep(path.parent):
        return path, path.name
    if is_sweep(path.parent):
        names = [r["name"] for r in read_manifest(path.parent)["runs"]]
        if path.name in names:
            return path.parent, path.name
        raise UserError(f"{path.parent} has no run {path.name}; its runs: {', '.join(names) or 'none'}")
    raise UserError(f"{path} is not a run folder or a sweep folder (no {SUBMISSION_FILE}, no {MANIFEST_FILE}); {USAGE}")


def _tail(log: Path, lines: int) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-lines:]


def show_sweep(sweep_dir: Path) -> None:
    """Each run's last lines, and how to see one whole."""
    manifest = read_manifest(sweep_dir)
    executor = executor_for(manifest)
    for record in manifest["runs"]:
        logs = executor.log_files(Path(record["run_dir"]))
        print(f"==> {record['name']} ({logs[-1] if logs else 'no log yet'}) <==")
        for line in _tail(logs[-1], SWEEP_TAIL_LINES) if logs else []:
            print(line)
    print(f"[tunefleet] one run's whole log: tunefleet logs {Path(sweep_dir) / 'RUN'} [-f]")


class LogPrinter:
    """Prints each of a run's log files once, then what is appended to them; a header names each file
    when there are several (as tail does)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.offsets: dict[Path, int] = {}
        self.current: Path | None = None

    def print_new(self, logs: list[Path]) -> None:
        for log in logs:
            offset = self.offsets.get(log, 0)
            size = log.stat().st_size
            if size < offset:  # truncated or replaced: start again
                offset = 0
            if size == offset:
                continue
            if log != self.current and (len(logs) > 1 or self.current is not None):
                self.out.write(f"==> {log} <==\n")
            with log.open("rb") as f:
                f.seek(offset)
                self.out.write(f.read(size - offset).decode(errors="replace"))
            self.offsets[log], self.current = size, log
        self.out.flush()


def run_ended(target: Path, name: str) -> bool:
    """Whether the run has ended, judged as `tunefleet status` judges it (one query for this job)."""
    manifest = read_manifest(target)  # afresh: a supervisor or search driver updates it
    record = next(r for r in manifest["runs"] if r["name"] == name)
    try:
        jobs = executor_for(manifest).jobs({**manifest, "runs": [record]})
    except SchedulerDidNotAnswer:
        return False  # unknown is not ended: keep following
    return run_state(record, jobs).ended


def show_run(target: Path, name: str, follow: bool) -> None:
    manifest = read_manifest(target)
    executor = executor_for(manifest)
    run_dir = Path(next(r for r in manifest["runs"] if r["name"] == name)["run_dir"])
    printer = LogPrinter()
    printer.print_new(executor.log_files(run_dir))
    if not printer.offsets and not follow:
        print(f"[tunefleet] {run_dir} has no log yet (Slurm writes RUN/slurm/slurm-JOB.out once the job starts)",
              file=sys.stderr)
    while follow:
        ended = run_ended(target, name)
        printer.print_new(executor.log_files(run_dir))  # read after the state: nothing written before the end is lost
        if ended:
            return
        time.sleep(FOLLOW_POLL_S)


def cmd_logs(words: list[str]) -> int:
    path, follow = _split(words)
    if is_sweep(path):
        if follow:
            raise UserError(f"{path} is a sweep: follow one of its runs, e.g. tunefleet logs {path}/RUN -f")
        show_sweep(path)
        return 0
    target, name = _run_target(path)
    show_run(target, name, follow)
    return 0
