"""What `tunefleet run` prints and passes on: copyable commands, the user's environment, errors on
every rank, the re-run command of a finished run, and progress lines that suit a log file."""

import io
import os
import re
import shlex
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from launcher import cli, run as run_script
from launcher.config.load import load_recipe
from launcher.launch import accelerate_command
from launcher.outputs.progress import LineProgress, progress_bar
from launcher.outputs.run_dir import write_resolved_recipe
from launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted

ROOT = Path(__file__).resolve().parents[1]
# A value with spaces, both kinds of quotes and a shell metacharacter.
HOSTILE_DIR = 'my run\'s "dir" $HOME'


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """Enough of a model folder for preflight, which loads nothing."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


@pytest.fixture
def launched(monkeypatch):
    """Run `tunefleet run` for a two-process recipe up to the launch, recording what would be started."""
    calls = []
    monkeypatch.setattr(cli, "run_workers", lambda argv, env: calls.append((argv, env)) or 0)
    return calls


def launching_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("[tunefleet] launching: ")]
    return line.removeprefix("[tunefleet] launching: ")


def test_launch_command_is_printed_shell_quoted(fake_model, tmp_path, launched, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    words = ["recipe=lora", f"model.name={fake_model}", "distributed.num_processes=2",
             f"output.dir={tmp_path / HOSTILE_DIR}", """eval.sample_prompts=["it's a \\"test\\""]"""]
    assert cli.main(["run", *words]) == 0
    [(argv, env)] = launched
    printed = shlex.split(launching_line(capsys.readouterr().out))
    # The shell reads back exactly the environment we add and the argv we start, hostile words intact.
    added = {k: env[k] for k in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")}
    assert printed == [f"{k}={v}" for k, v in added.items()] + argv
    assert argv[-len(words):] == words


def test_users_omp_num_threads_is_kept(fake_model, launched, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.main(["run", "recipe=lora", f"model.name={fake_model}", "distributed.num_processes=2"]) == 0
    [(_, env)] = launched
    assert env["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in launching_line(capsys.readouterr().out)


def test_cpu_runs_get_a_fixed_mmap_threshold_unless_the_user_set_one():
    _, recipe = load_recipe(["recipe=lora", "distributed.num_processes=2"])
    assert accelerate_command(recipe, [], has_gpu=False, environ={})[1]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert "MALLOC_MMAP_THRESHOLD_" not in accelerate_command(recipe, [], has_gpu=False,
                                                             environ={"MALLOC_MMAP_THRESHOLD_": "65536"})[1]
    assert "MALLOC_MMAP_THRESHOLD_" not in accelerate_command(recipe, [], has_gpu=True, environ={})[1]


def test_omp_default_only_where_the_user_set_none():
    _, recipe = load_recipe(["recipe=lora", "distributed.num_processes=2"])
    _, env = accelerate_command(recipe, [], has_gpu=False, cpu_count=8, environ={})
    assert env["OMP_NUM_THREADS"] == "4"
    _, env = accelerate_command(recipe, [], has_gpu=False, cpu_count=8, environ={"OMP_NUM_THREADS": "7"})
    assert "OMP_NUM_THREADS" not in env


def header_lines(recipe_file: Path) -> list[str]:
    return [line for line in recipe_file.read_text().splitlines() if line.startswith("#")]


def test_resolved_recipe_header_is_shell_quoted(tmp_path):
    _, recipe = load_recipe(["recipe=lora"])
    run_dir = tmp_path / HOSTILE_DIR
    run_dir.mkdir()
    command = ["launcher/run.py", "recipe=lora", f"output.dir={run_dir}", "eval.sample_prompts=[\"it's\"]"]
    write_resolved_recipe(run_dir, recipe, command)
    [started] = [line for line in header_lines(run_dir / "recipe.yaml") if line.startswith("# Started as: ")]
    assert shlex.split(started.removeprefix("# Started as: ")) == command
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["lr"] == recipe.train.lr


def test_a_newline_in_the_command_keeps_the_header_a_comment(tmp_path):
    _, recipe = load_recipe(["recipe=lora"])
    write_resolved_recipe(tmp_path, recipe, ["launcher/run.py", "eval.sample_prompts=[\"two\nlines\"]"])
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["model"]["name"] == recipe.model.name


def rerun_command(recipe_file: Path) -> list[str]:
    lines = header_lines(recipe_file)
    return shlex.split(lines[lines.index("# Resolved recipe of this run. Re-run it into a new folder with:") + 1][1:])


def test_the_advertised_rerun_command_runs(tiny_llama, tmp_path, capsys):
    quick = [f"model.name={tiny_llama}", "train.max_steps=1", "eval.every_steps=null", "eval.at_start=false",
             "eval.sample_prompts=[]", "data.max_samples=16", "data.max_eval_samples=4"]
    first = tmp_path / "runs" / "first"
    assert cli.main(["run", "recipe=lora", *quick, f"output.dir={first}"]) == 0
    command = rerun_command(first / "recipe.yaml")
    assert command[:2] == ["tunefleet", "run"]
    # The command as advertised, through the real entry point (`tunefleet` is `python -m launcher.cli`).
    done = subprocess.run([sys.executable, "-m", "launcher.cli", *command[1:]], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [second] = [p for p in (tmp_path / "runs").iterdir() if p != first]
    assert second.name.startswith("first-rerun-") and (second / "recipe.yaml").is_file()
    assert (second / "final").is_dir()


def test_user_error_on_another_rank_is_printed_with_rank_and_host(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert run_script.main(["recipe=lora", "data.train=missing_on_this_machine.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error (rank 1 on {socket.gethostname()}): ") and "missing_on_this_machine" in err
    monkeypatch.setenv("RANK", "0")
    assert run_script.main(["recipe=lora", "data.train=missing_on_this_machine.jsonl"]) == 2
    assert capsys.readouterr().err.startswith("error: data.train=missing_on_this_machine.jsonl")


def test_preempted_worker_survives_a_vanished_status_folder(fake_model, tmp_path, monkeypatch):
    """The CLI's temporary folder is gone when the CLI was killed; the stopping worker must still exit 75."""
    def run_training(*_):
        raise Preempted(tmp_path / "run" / "checkpoints" / "step-3")

    monkeypatch.setitem(sys.modules, "launcher.train.loop", types.SimpleNamespace(run_training=run_training))
    monkeypatch.setenv("TUNEFLEET_STATUS_FILE", str(tmp_path / "gone" / "status"))
    assert run_script.main(["recipe=lora", f"model.name={fake_model}", f"output.dir={tmp_path / 'run'}"]) == 75
    assert PREEMPTED_EXIT_CODE == 75


# ---------------------------------------------------------------- progress in a log file

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_whole_lines_every_tenth(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("launcher.outputs.progress.time.monotonic", clock)
    log = io.StringIO()
    with progress_bar(200, "training", enabled=True, stream=log) as bar:
        for step in range(200):
            clock.now += 0.5
            bar.update(1)
            bar.set_postfix(loss=f"{2 - step / 200:.4f}")
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 100%; close() adds nothing after the 100% line
    assert re.fullmatch(r"\[tunefleet\] training: 40/200 steps \(20%\), loss=1\.8\d+, 2 steps/s, eta 1m20s", lines[1])
    assert lines[-1].startswith("[tunefleet] training: 200/200 steps (100%)") and "took 1m40s" in lines[-1]


def test_progress_in_a_log_also_prints_every_30_seconds_and_resumes_counting(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("launcher.outputs.progress.time.monotonic", clock)
    log = io.StringIO()
    bar = progress_bar(1000, "training", enabled=True, initial=500, stream=log)
    for _ in range(4):
        clock.now += 31
        bar.update(1)  # far from the next 10% mark, but 30 s have passed
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("[tunefleet] training: 501/1000 steps (50%)")


def test_short_evaluation_leaves_no_lines_and_a_disabled_bar_none():
    log = io.StringIO()
    bar = progress_bar(5, "evaluating", enabled=True, unit="batches", leave=False, every_percent=None, stream=log)
    for _ in range(5):
        bar.update(1)
    bar.close()
    quiet = progress_bar(5, "training", enabled=False, stream=log)
    quiet.update(5)
    quiet.close()
    assert log.getvalue() == ""


def test_progress_in_a_terminal_is_a_tqdm_bar():
    from tqdm.auto import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(10, "training", enabled=True, stream=Terminal())
    assert isinstance(bar, tqdm) and not isinstance(bar, LineProgress)
    bar.close()


def test_an_entry_point_exits_with_its_code_after_its_atexit_handlers_and_flushed_output():
    """launcher/process_exit.py skips only the interpreter's last cyclic collection (seconds per process)."""
    script = ("import atexit, sys; atexit.register(lambda: print('atexit ran')); sys.stdout.write('unflushed'); "
              "from launcher.process_exit import exit_with; exit_with(3)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 3 and done.stdout == "unflushedatexit ran\n", done
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tunefleet"] == "launcher.cli:console"


@pytest.mark.parametrize("verbosity, main_process, shown", [
    ("normal", True, ["library UserWarning", "our FutureWarning"]),
    ("normal", False, ["our FutureWarning"]),
    ("debug", False, ["library FutureWarning", "library UserWarning", "our FutureWarning"]),
])
def test_library_warnings_are_shown_once_and_only_when_they_are_the_users(verbosity, main_process, shown):
    """launcher/outputs/console.py: a library's deprecation is never the user's; another rank's library
    warnings repeat the main rank's; tunefleet's own warnings always show; debug shows everything."""
    script = f"""
import warnings
from launcher.outputs.console import quiet_libraries
quiet_libraries({verbosity!r}, main_process={main_process})
warnings.warn_explicit("library FutureWarning", FutureWarning, "x.py", 1, module="torch.distributed.c10d_logger")
warnings.warn_explicit("library UserWarning", UserWarning, "y.py", 2, module="transformers.modeling_utils")
warnings.warn_explicit("our FutureWarning", FutureWarning, "z.py", 3, module="launcher.train.loop")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = [m for m in ("library FutureWarning", "library UserWarning", "our FutureWarning") if m in done.stderr]
    assert said == shown, done.stderr


def test_no_gpu_driver_means_no_gpu_without_asking_torch(monkeypatch):
    """`tunefleet run` skips importing torch (1.2 s) where no GPU driver exists; with one, torch decides."""
    from launcher import launch

    monkeypatch.setattr(launch.os.path, "exists", lambda path: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch would now raise
    assert launch.has_usable_gpu() is False
    monkeypatch.undo()
    import torch

    monkeypatch.setattr(launch.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.has_usable_gpu() is True
