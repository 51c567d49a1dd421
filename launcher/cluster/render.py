"""Render a Slurm batch script from a template in slurm/ and a cluster profile.

The shipped templates are usable by hand (`sbatch slurm/multi_node.sbatch recipe=lora`); rendering
keeps their body and comments and changes three things: the #SBATCH block takes the profile's
values, the profile's setup lines run first, and the recipe words are fixed with `set --` so the
script runs as it would with those words as arguments. Every value that reaches the shell goes
through `shell_word` (one place, tested with hostile values); #SBATCH values are checked by the
profile; paths (log file, working folder) go on sbatch's command line as separate arguments.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from launcher.cluster.profiles import ClusterProfile

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "slurm"
DIRECTIVE = re.compile(r"^#SBATCH\s+(--?[A-Za-z][A-Za-z0-9-]*)(?:[= ](\S+))?")


def shell_word(value: str) -> str:
    """`value` as one shell word that the shell reads back exactly (no expansion of any kind)."""
    return shlex.quote(value)


def template_for(nodes: int) -> Path:
    return TEMPLATES_DIR / ("multi_node.sbatch" if nodes > 1 else "single_node.sbatch")


def profile_directives(profile: ClusterProfile, job_name: str) -> dict[str, str | None]:
    """#SBATCH options the profile decides (None: a flag without a value)."""
    options: dict[str, str | None] = {"--job-name": job_name, "--nodes": str(profile.nodes),
                                      "--signal": f"B:USR1@{profile.signal_seconds}", "--time": profile.time}
    for option, value in (("--partition", profile.partition), ("--account", profile.account), ("--qos", profile.qos),
                          ("--mem", profile.mem), ("--constraint", profile.constraint),
                          ("--cpus-per-task", profile.cpus_per_task),
                          ("--gpus-per-node", profile.gpus_per_node or None)):
        if value is not None:
            options[option] = str(value)
    for extra in profile.sbatch:
        option, _, value = extra.partition("=")
        options[option] = value or None
    return options


def render(template: Path, profile: ClusterProfile, words: list[str], job_name: str, python: str) -> str:
    """The batch script for `words` (recipe and overrides) on the profile's cluster."""
    lines = template.read_text().splitlines()
    directive_rows = [i for i, line in enumerate(lines) if DIRECTIVE.match(line)]
    first, last = directive_rows[0], directive_rows[-1]
    options: dict[str, str | None] = {}
    for i in directive_rows:
        name, value = DIRECTIVE.match(lines[i]).groups()
        options[name] = value
    options.update(profile_directives(profile, job_name))
    options.pop("--output", None)  # given on sbatch's command line: a path is an argument there, not script text
    block = [f"#SBATCH {name}" + (f"={value}" if value is not None else "") for name, value in options.items()]
    # The body's comments explain the directives; keep them, then fix the words before the body's
    # first command (which reads TUNEFLEET_PYTHON).
    body = lines[last + 1:]
    start = next(i for i, line in enumerate(body) if line.strip() and not line.startswith("#"))
    prologue = ["", "# --- written by `tunefleet submit`: the cluster profile's setup and this run's words ---",
                *profile.setup,
                f"export TUNEFLEET_PYTHON={shell_word(python)}",
                f"export TUNEFLEET_MAX_RESTARTS={profile.max_restarts}",
                "set -- " + " ".join(shell_word(w) for w in words),
                "# --- end of what `tunefleet submit` wrote ---", ""]
    return "\n".join([*lines[:first], *block, *body[:start], *prologue, *body[start:]]) + "\n"
