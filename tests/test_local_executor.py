"""Processes the local executor and a local search start: `tunefleet run` with its output appended to
RUN/local.log. The child holds the log; the parent keeps no handle on it, open or left for the garbage collector."""

import gc
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def no_handle_left_on(log: Path):
    """Neither open after the block nor closed by the garbage collector (an unclosed file's ResourceWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        assert log.resolve() not in open_files()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and log.name in str(w.message)]


def test_a_started_run_writes_its_log_and_the_parent_holds_no_handle_on_it(tmp_path):
    from launcher.cluster.local_executor import start_run

    with no_handle_left_on(tmp_path / "local.log"):
        child = start_run(FAILS_AT_ONCE, tmp_path)
    assert child.wait(timeout=120) != 0
    assert "no-such-recipe" in (tmp_path / "local.log").read_text()  # the child kept its own copy


def test_a_search_trial_started_on_this_machine_leaves_no_handle_in_the_driver(tmp_path):
    from launcher.search.trials import LocalTrials

    trials = LocalTrials([])
    record = {"name": "trial-000", "run_dir": str(tmp_path), "words": FAILS_AT_ONCE}
    with no_handle_left_on(tmp_path / "local.log"):
        trials.start(record)
    trials.wait(record)
    assert trials.ended(record) and "no-such-recipe" in (tmp_path / "local.log").read_text()


def test_output_is_appended_to_the_log(tmp_path):
    from launcher.cluster.local_executor import start_logged

    log = tmp_path / "detached.log"
    log.write_text("before\n")
    with no_handle_left_on(log):
        child = start_logged([sys.executable, "-c", "print('after')"], log, start_new_session=True)
    child.wait(timeout=60)
    assert log.read_text() == "before\nafter\n"
