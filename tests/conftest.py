import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), PROJECT_ROOT)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), PROJECT_ROOT)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenized-data caches go to a per-session folder; converted real models stay in the user cache."""
    monkeypatch.setenv("TUNEFLEET_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data-cache"))


# A test stuck inside C++ (a gloo collective, a store wait) never returns to Python, so
# pytest-timeout's SIGALRM cannot stop it and the suite would hang until CI kills it, printing
# nothing. This watchdog, a thread, notices a test that outlived its timeout by a margin, prints
# every thread's stack and the processes below pytest to the real terminal, and ends the session.
WATCHDOG_MARGIN_S = 180


def _dump_and_exit(config, nodeid: str, limit: float) -> None:
    import faulthandler
    import subprocess
    import sys

    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[watchdog] {nodeid} still running {limit:.0f} s after it started: stacks, then exit",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        tree = subprocess.run(["ps", "-eo", "pid,ppid,etimes,rss,args", "--forest"], capture_output=True, text=True)
        print(f"pytest is pid {os.getpid()}\n{tree.stdout[-8000:]}", file=sys.stderr, flush=True)
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import threading

    mark = item.get_closest_marker("timeout")
    timeout = float(mark.args[0] if mark and mark.args else item.config.getini("timeout") or 0)
    if timeout <= 0:
        yield
        return
    limit = timeout + WATCHDOG_MARGIN_S
    timer = threading.Timer(limit, _dump_and_exit, args=(item.config, item.nodeid, limit))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def tiny_moe(tiny_llama, tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"), tiny_llama)


@pytest.fixture(scope="session")
def tiny_bert_classifier(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert with a saved head for the part-of-speech labels (data/wordnet/pos_*.jsonl, sorted)."""
    from tests.tiny_models import build_tiny_bert_classifier

    return build_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-bert-classifier"), tiny_bert,
                                      ["adjective", "adverb", "noun", "verb"])


@pytest.fixture(scope="module")
def slurm():
    from tests.slurm_cluster import ensure_cluster, stop_cluster

    env, started = ensure_cluster()
    yield env
    if started:
        stop_cluster()
