"""Render a Slurm batch script from a template in slurm/ and a cluster profile.

The shipped templates are usable by hand (`sbatch slurm/multi_node.sbatch recipe=lora`); rendering
keeps their body and comments and changes three things: the #SBATCH block takes the profile's
values, the profile's setup lines run first, and the recipe words are fixed with `set --` so the
script runs as it would with those words as arguments. Every value that reaches the shell goes
through `shell_word` (one place, tested with hostile values); every #SBATCH value is checked here
once more, whatever its source (profile, template, job name), since a newline in one would end the
directive block's line and start a shell line; paths (log file, working folder) go on sbatch's
command line as separate arguments.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from launcher.cluster.job_settings import SETTINGS_ENV
from launcher.cluster.profiles import SAFE_VALUE, ClusterProfile
from launcher.config.assets import shipped
from launcher.errors import UserError

COLLECT_TIME = "00:30:00"  # tables, a plot and TensorBoard files: minutes even for a large sweep
DIRECTIVE = re.compile(r"^#SBATCH\s+(--?[A-Za-z][A-Za-z0-9-]*)(?:[= ](\S+))?")


def shell_word(value: str) -> str:
    """`value` as one shell word that the shell reads back exactly (no expansion of any kind)."""
    return shlex.quote(value)


def safe_job_name(prefix: str, name: str) -> str:
    """A Slurm job name from a folder name: any run of other characters becomes one '-', at most 64 long."""
    return (prefix + re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-"))[:64]


def template_for(nodes: int) -> Path:
    return shipped("slurm") / ("multi_node.sbatch" if nodes > 1 else "single_node.sbatch")


def check_directives(options: dict[str, str | None]) -> None:
    """Every #SBATCH value plain, whatever gave it: a newline would start a shell line after the directive."""
    for name, value in options.items():
        if value is not None and not SAFE_VALUE.match(value):
            raise UserError(f"#SBATCH {name}={value!r}: a directive value holds only letters, digits and "
                            "_.,:=+@%/-[]()&|*; change the value that gave it")


def profile_directives(profile: ClusterProfile, job_name: str) -> dict[str, str | None]:
    """#SBATCH options the profile decides (None: a flag without a value)."""
    options: dict[str, str | None] = {"--job-name": job_name, "--nodes": str(profile.nodes),
                                      "--signal": f"B:USR1@{profile.signal_seconds}", "--time": profile.time}
    for option, value in (("--partition", profile.partition), ("--account", profile.account), ("--qos", profile.qos),
                          ("--mem", profile.mem), ("--constraint", profile.constraint),
                          ("--cpus-per-task", profile.cpus_per_task),
                          ("--gpus-per-node", profile.gpus_per_node if profile.gpu_count else None)):
        if value is not None:
            options[option] = str(value)
    for extra in profile.sbatch:
        option, _, value = extra.partition("=")
        options[option] = value or None
    return options


def render(template: Path, profile: ClusterProfile, words: list[str], job_name: str, python: str,
           settings_file: Path | None = None) -> str:
    """The batch script for `words` (recipe and overrides) on the profile's cluster; `settings_file`:
    the job-settings.json the batch process reads (launcher.cluster.job_settings)."""
    lines = template.read_text().splitlines()
    directive_rows = [i for i, line in enumerate(lines) if DIRECTIVE.match(line)]
    first, last = directive_rows[0], directive_rows[-1]
    options: dict[str, str | None] = {}
    for i in directive_rows:
        name, value = DIRECTIVE.match(lines[i]).groups()
        options[name] = value
    options.update(profile_directives(profile, job_name))
    options.pop("--output", None)  # given on sbatch's command line: a path is an argument there, not script text
    check_directives(options)
    block = [f"#SBATCH {name}" + (f"={value}" if value is not None else "") for name, value in options.items()]
    # The body's comments explain the directives; keep them, then fix the words before the body's
    # first command (which reads TUNEFLEET_PYTHON).
    body = lines[last + 1:]
    start = next(i for i, line in enumerate(body) if line.strip() and not line.startswith("#"))
    prologue = ["", "# --- written by `tunefleet submit`: the cluster profile's setup and this run's words ---",
                *profile.setup,
                *([f"export {SETTINGS_ENV}={shell_word(str(settings_file))}"] if settings_file else []),
                f"export TUNEFLEET_PYTHON={shell_word(python)}",
                f"export TUNEFLEET_MAX_RESTARTS={profile.max_restarts}",
                "set -- " + " ".join(shell_word(w) for w in words),
                "# --- end of what `tunefleet submit` wrote ---", ""]
    return "\n".join([*lines[:first], *block, *body[:start], *prologue, *body[start:]]) + "\n"


def render_collect(profile: ClusterProfile, sweep_dir: Path, python: str) -> str:
    """The batch script of a sweep's collect job: one small task on the profile's partition and account,
    after the profile's setup (which makes `python` the one with tunefleet)."""
    options = {"--job-name": safe_job_name("tf-collect-", sweep_dir.name), "--nodes": "1", "--ntasks": "1",
               "--time": COLLECT_TIME}
    for option, value in (("--partition", profile.partition), ("--account", profile.account), ("--qos", profile.qos)):
        if value is not None:
            options[option] = value
    check_directives(options)
    return "\n".join(["#!/bin/bash",
                      "# Written by `tunefleet submit`: collects the sweep once its job array has ended",
                      "# (sbatch --dependency=afterany:ARRAY); by hand: tunefleet collect SWEEP.",
                      *(f"#SBATCH {name}={value}" for name, value in options.items()), "",
                      *profile.setup,
                      f"exec {shell_word(python)} -m launcher.cli collect {shell_word(str(sweep_dir))}", ""])
