"""Processes the local executor and a local search start: `tunefleet run` with its output appended to RUN/local.log."""

import os
import sys
from pathlib import Path

from launcher.cluster.local_executor import start_logged, start_run
from launcher.search.trials import LocalTrials

FAILS_AT_ONCE = ["recipe=no-such-recipe"]  # `tunefleet run` refuses it with one line and exits


def open_files() -> set[Path]:
    """The files this process holds open."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            continue  # the descriptor listdir itself used, already closed
    return held


def test_a_started_run_writes_its_log_and_the_parent_holds_no_handle_on_it(tmp_path):
    child = start_run(FAILS_AT_ONCE, tmp_path)
    assert (tmp_path / "local.log").resolve() not in open_files()
    assert child.wait(timeout=120) != 0
    assert "no-such-recipe" in (tmp_path / "local.log").read_text()  # the child kept its own copy


def test_a_search_trial_started_on_this_machine_leaves_no_handle_in_the_driver(tmp_path):
    trials = LocalTrials([])
    record = {"name": "trial-000", "run_dir": str(tmp_path), "words": FAILS_AT_ONCE}
    trials.start(record)
    assert (tmp_path / "local.log").resolve() not in open_files()
    trials.wait(record)
    assert trials.ended(record) and "no-such-recipe" in (tmp_path / "local.log").read_text()


def test_output_is_appended_to_the_log(tmp_path):
    log = tmp_path / "detached.log"
    log.write_text("before\n")
    start_logged([sys.executable, "-c", "print('after')"], log, start_new_session=True).wait(timeout=60)
    assert log.read_text() == "before\nafter\n" and log.resolve() not in open_files()
