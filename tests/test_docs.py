"""Every command the README and docs/ show is run here, so that none can rot.

Commands are taken from README.md and docs/*.md: lines of code blocks (indented or fenced) and inline
code spans that start with `tunefleet`, `make`, `accelerate launch`, `python` or `pip`. Each must match
exactly one rule below, or this test fails naming it: a new kind of command needs a rule, not silence.

How each kind runs (the command's own words are kept; only what a test machine lacks is added):
- reading commands (validate, plan, recipes, keys) and dry runs run as shown;
- a Slurm submission without --dry-run gets --dry-run (no cluster here; tests/test_slurm*.py submit
  to a real one);
- training commands run on the tiny test model for 2 steps (`model.name=` and a few quick settings
  appended), from a scratch folder where `runs/...` resolve;
- commands that name a run, sweep or search folder (`runs/lora-20261122-101500`, ...) run on the
  folder the commands before made;
- a few are run elsewhere, each naming the test that runs it (make test: CI's own command; the wheel
  install: tests/test_install.py; a search on Slurm: tests/test_slurm.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("tunefleet ", "make ", "accelerate launch ", "python ", "pip ")
OPTIONAL = re.compile(r"\s\[[^\]]*\]")  # `[--watch]`, `[-f]`, `[section]`: shown as optional, run without
TINY = ["train.max_steps=2", "eval.every_steps=null", "eval.at_start=false", "eval.sample_prompts=[]",
        "data.max_samples=64", "data.max_eval_samples=8", "output.trackers=[]"]
# Placeholder folders in the docs, and the folder each stands for here (found after the producers ran).
PLACEHOLDERS = {
    r"runs/lora-\d{8}-\d{6}": "newest_run",
    r"\bRUN(?=[/-])": "newest_run",
    r"runs/sweep-\d{8}-\d{6}/(lr-[\w.-]+)": "sweep_run",
    r"runs/sweep-\d{8}-\d{6}": "sweep",
}
ELSEWHERE = {  # command (as extracted) -> the test that runs it, and why not here
    "make test": ("tests", "CI runs it on a clean clone: it is this suite"),
    "make test-fast": ("tests", "the suite without the slow tests"),
    "make gpu-check": ("tests/test_bench_harness.py", "needs an NVIDIA GPU; its harness is tested on CPU there"),
}
ELSEWHERE_PATTERNS = {
    r"^pip (install|wheel) ": ("tests/test_install.py", "builds the wheel and installs it into a fresh environment"),
    r"^tunefleet search \S+ executor=slurm": ("tests/test_slurm.py", "trials as jobs on the local Slurm cluster"),
    r"^python -m launcher\.cluster\.node$": ("tests/test_slurm.py", "what each node of a Slurm job runs"),
}


@dataclass(frozen=True)
class Shown:
    page: str
    line: int
    command: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.command}"


def _clean(text: str) -> list[str]:
    """The commands of one shown line: comments and optional parts dropped, `;`-joined commands split."""
    text = OPTIONAL.sub("", re.sub(r"^\$\s+", "", text.strip()))
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    joined = shlex.join(words)
    return [part.strip() for part in joined.split(" ';' ") if part.strip()]


def _is_example(span: str) -> bool:
    """An inline code span is an example to run when it is a whole command: more than `tunefleet VERB`, with
    no placeholder (RUN, SWEEP) or alternatives (h100|a100); prose names commands in shorter spans."""
    words = span.split()
    whole = words[0] in ("pip", "make") or any("=" in w for w in words[2:])
    return whole and len(words) >= 2 and "|" not in span and not any(re.fullmatch(r"[A-Z][A-Z_]*", w) for w in words)


def documented_commands() -> list[Shown]:
    found = []

    def add(page: Path, number: int, text: str) -> None:
        stripped = re.sub(r"^\$\s+", "", text.strip())
        if stripped.startswith(STARTS):
            name = page.name if page.parent == ROOT else f"docs/{page.name}"
            found.extend(Shown(name, number, command) for command in _clean(stripped))

    for page in PAGES:
        fenced, prose, prose_start = False, [], 0

        def flush() -> None:  # a paragraph's inline spans, which may wrap onto the next line
            for span in re.findall(r"`([^`]+)`", " ".join(prose)):
                if _is_example(span):
                    add(page, prose_start, span)
            prose.clear()

        for number, line in enumerate(page.read_text().splitlines(), start=1):
            if line.lstrip().startswith("```"):
                flush()
                fenced = not fenced
            elif fenced or line.startswith(("    ", "\t")):
                flush()
                add(page, number, line)
            elif not line.strip():
                flush()
            else:
                if not prose:
                    prose_start = number
                prose.append(line.strip())
        flush()
    return found


def kind_of(command: str) -> str:
    """Which rule runs a command (see the module's docstring)."""
    if command in ELSEWHERE or any(re.search(p, command) for p in ELSEWHERE_PATTERNS):
        return "elsewhere"
    words = command.split()
    if command == "make demo":
        return "train"  # `tunefleet run recipe=lora` (the Makefile's demo target, checked below)
    if words[:2] == ["accelerate", "launch"] or words[:2] == ["python", "launcher/run.py"]:
        return "train"
    if words[0] != "tunefleet" or len(words) < 2:
        return "unknown"
    verb = words[1]
    if verb in ("validate", "plan", "recipes", "keys"):
        return "read"
    if verb == "run":
        return "folder" if any(re.search(p, command) for p in PLACEHOLDERS) else "train"
    if verb == "submit":
        return "sweep" if "executor=local" in words else "slurm"
    if verb == "search":
        return "search" if len(words) > 2 and words[2].endswith(".yaml") else "folder"
    if verb in ("status", "logs", "cancel", "collect", "merge"):
        return "folder"
    return "unknown"


def test_every_documented_command_has_a_rule():
    shown = documented_commands()
    assert len(shown) >= 20, "the extraction found too few commands: is the README still where it was?"
    unknown = [str(s) for s in shown if kind_of(s.command) == "unknown"]
    assert not unknown, "commands in the docs that this test does not know how to run:\n" + "\n".join(unknown)
    for command, (where, _) in ELSEWHERE.items():
        assert (ROOT / where).exists()
    for _, (where, _) in ELSEWHERE_PATTERNS.items():
        assert (ROOT / where).exists()
    demo = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert demo.split()[-2:] == ["run", "recipe=lora"], f"make demo runs {demo!r}; update this test's rule"


@dataclass
class Workspace:
    folder: Path
    env: dict
    tiny_words: list[str]

    def run(self, command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        argv = shlex.split(command)
        if argv[0] == "tunefleet":
            argv = [sys.executable, "-m", "launcher.cli", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        elif argv[:2] == ["accelerate", "launch"]:
            argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *argv[2:]]
        return subprocess.run(argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tiny_llama, tmp_path_factory):
    """A scratch folder like a user's: the repository's example files, nothing else; the search trimmed to
    two short trials on the tiny model (same file name, so the documented words run unchanged)."""
    folder = tmp_path_factory.mktemp("docs")
    for name in ("launcher", "sweeps"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "searches").mkdir()
    spec = (ROOT / "searches" / "lora.yaml").read_text()
    spec = re.sub(r"^trials: \d+", "trials: 2", spec, flags=re.M)
    spec = re.sub(r"^base: \[recipe=lora, .*\]$",
                  f"base: [recipe=lora, model.name={tiny_llama}, train.max_steps=4, eval.every_steps=2, "
                  "data.max_samples=64, data.max_eval_samples=8, \"eval.sample_prompts=[]\"]", spec, flags=re.M)
    (folder / "searches" / "lora.yaml").write_text(spec)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return Workspace(folder, env, [f"model.name={tiny_llama}", *TINY])


def _by_kind(kind: str) -> list[Shown]:
    """Each distinct command once (pages repeat the README's), in the order first shown."""
    seen: dict[str, Shown] = {}
    for shown in documented_commands():
        if kind_of(shown.command) == kind:
            seen.setdefault(shown.command, shown)
    return list(seen.values())


def _ok(done: subprocess.CompletedProcess, shown: Shown | str) -> None:
    assert done.returncode == 0, f"{shown}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, f"{shown}\n{done.stderr[-3000:]}"


def test_reading_commands_and_dry_runs_work_as_shown(workspace):
    for shown in _by_kind("read"):
        done = workspace.run(shown.command)
        if "train.lrr=1" in shown.command:  # the README's example of a bad recipe: one message, exit 2
            assert done.returncode == 2 and "Traceback" not in done.stderr, shown
            continue
        _ok(done, shown)
    for shown in _by_kind("slurm"):
        words = shown.command if "--dry-run" in shown.command else shown.command + " --dry-run"
        done = workspace.run(words)
        _ok(done, shown)
        assert "#SBATCH" in done.stdout, shown
    assert not list(workspace.folder.glob("runs/*")), "reading commands and dry runs write nothing"


@pytest.mark.slow
def test_training_sweep_and_search_commands_run_and_their_folders_answer(workspace):
    tiny = " ".join(shlex.quote(w) for w in workspace.tiny_words)
    for shown in _by_kind("train"):
        command = "tunefleet run recipe=lora" if shown.command == "make demo" else shown.command
        _ok(workspace.run(f"{command} {tiny}"), shown)
    for shown in _by_kind("sweep"):
        _ok(workspace.run(f"{shown.command} {tiny}"), shown)
    searches = _by_kind("search")
    for shown in searches:
        _ok(workspace.run(shown.command), shown)

    runs = workspace.folder / "runs"
    sweeps = [p for p in runs.glob("sweep-*") if (p / "manifest.json").exists()]
    assert sweeps or not _by_kind("sweep"), "the documented local sweep made no sweep folder"

    def ended(folder: Path) -> bool:
        done = workspace.run(f"tunefleet status {folder}")
        return done.returncode == 0 and not re.search(r"\b(pending|running)\b", done.stdout.split("\n", 1)[-1])

    for folder in [*sweeps, *(p for p in runs.glob("search-*") if p.is_dir())]:
        assert wait_for(lambda: ended(folder), 400, every=2.0), f"{folder} did not end"

    newest = max((p for p in runs.glob("lora-*") if (p / "recipe.yaml").exists()), key=lambda p: p.stat().st_mtime)
    for shown in _by_kind("folder"):
        command = shown.command
        for pattern, what in PLACEHOLDERS.items():
            match = re.search(pattern, command)
            if not match:
                continue
            if what == "newest_run":
                target = newest
            elif what == "sweep":
                target = sweeps[0]
            else:
                target = next(sweeps[0].glob(f"{match.group(1)}*"), None) or next(p for p in sweeps[0].iterdir()
                                                                                   if (p / "recipe.yaml").exists())
            command = re.sub(pattern, str(target), command)
            break
        if command.split()[1] == "run":  # a rerun from a run folder's recipe: on the tiny model too
            command += " " + tiny
        _ok(workspace.run(command), shown)
        if command.split()[1] == "search":  # a search continued: its driver runs on in the background
            folder = Path(command.split()[2])
            assert wait_for(lambda: ended(folder), 400, every=2.0), f"{folder} did not end"
